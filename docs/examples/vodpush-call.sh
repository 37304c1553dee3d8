#!/usr/bin/env bash
# Call the vodpush API from the shell, signed as docs/api.md#signing says:
#
#   docs/examples/vodpush-call.sh COMMAND ['"field":value,...']
#   docs/examples/vodpush-call.sh aws.status '"limit":5'
#
# The second argument is the command's own members, as JSON text without the braces. The
# envelope (command, api_key, timestamp, cdn) comes from VODPUSH_API_KEY and VODPUSH_CDN;
# the request is signed with VODPUSH_API_SECRET and POSTed to VODPUSH_URL. Prints the
# answer; exits 1 when it is a failure (so scripts can branch on it), 2 on a usage error.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 COMMAND ['\"field\":value,...']" >&2
    exit 2
fi
command=$1
members=${2:-}
: "${VODPUSH_URL:?set VODPUSH_URL}" "${VODPUSH_CDN:?set VODPUSH_CDN}"
: "${VODPUSH_API_KEY:?set VODPUSH_API_KEY}" "${VODPUSH_API_SECRET:?set VODPUSH_API_SECRET}"

body="{\"command\":\"$command\",\"api_key\":\"$VODPUSH_API_KEY\",\"timestamp\":$(date +%s),\"cdn\":$VODPUSH_CDN${members:+,$members}}"
# base64 HMAC-SHA256 of exactly these bytes, keyed with the API secret ...
signature=$(printf %s "$body" | openssl dgst -sha256 -hmac "$VODPUSH_API_SECRET" -binary | openssl base64 -A)
# ... added as the last member of the same text.
answer=$(curl -sS "$VODPUSH_URL" --data-urlencode "json=${body%\}},\"signature\":\"$signature\"}")
printf '%s\n' "$answer"
[[ $answer =~ \"status\":\ *\"success\" ]] || exit 1
