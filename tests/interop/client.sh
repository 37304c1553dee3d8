#!/usr/bin/env bash
# A ScaleEngine API client in the shell: the JSON text written by hand, signed with
# `openssl dgst -hmac`, the signature appended before the closing brace, sent with curl as a
# urlencoded field (--data-urlencode) or, with VODPUSH_CURL_FORM=1, as multipart
# (--form-string, which unlike -F gives no meaning to ';', '<' or '@' in the value).
#
# Environment: VODPUSH_URL, VODPUSH_COMMAND, VODPUSH_CDN, VODPUSH_API_KEY, VODPUSH_API_SECRET,
# VODPUSH_REQUEST (the command's fields as a JSON object text, e.g. {"limit":5}).
# Prints the answer on success; exits 3 with "API error <code>: <message>" on a failure
# answer, 4 when HTTP itself fails.
set -euo pipefail

fields=${VODPUSH_REQUEST:-\{\}}
fields=${fields#\{}
fields=${fields%\}}
body="{\"command\":\"$VODPUSH_COMMAND\",\"api_key\":\"$VODPUSH_API_KEY\",\"timestamp\":$(date +%s),\"cdn\":$VODPUSH_CDN${fields:+,$fields}}"
sig=$(printf %s "$body" | openssl dgst -sha256 -hmac "$VODPUSH_API_SECRET" -binary | openssl base64 -A)
json="${body%\}},\"signature\":\"$sig\"}"

if [ "${VODPUSH_CURL_FORM:-}" = 1 ]; then
  send=(--form-string "json=$json")
else
  send=(--data-urlencode "json=$json")
fi
answer=$(mktemp)
trap 'rm -f "$answer"' EXIT
code=$(curl -sS --max-time 20 -o "$answer" -w '%{http_code}' "${send[@]}" "$VODPUSH_URL") || {
  echo "HTTP error: curl failed" >&2
  exit 4
}
if [ "$code" != 200 ]; then
  echo "HTTP error: $code $(cat "$answer")" >&2
  exit 4
fi
# The answer is compact JSON; its status and code are plain strings.
if ! grep -q '"status":"success"' "$answer"; then
  api_code=$(grep -o '"code":"[0-9]*"' "$answer" | cut -d'"' -f4)
  message=$(sed -n 's/.*"message":\("[^"]*"\).*/\1/p' "$answer")
  echo "API error $api_code: $message" >&2
  exit 3
fi
cat "$answer"
echo
