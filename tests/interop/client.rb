#!/usr/bin/env ruby
# frozen_string_literal: true

# A ScaleEngine API client written the way Ruby integrations do it: rest-client posting a
# multipart `json` field, JSON.generate (compact, raw UTF-8, '/' not escaped) for the signed
# text and again once the signature is added.
#
# Environment: VODPUSH_URL, VODPUSH_COMMAND, VODPUSH_CDN, VODPUSH_API_KEY, VODPUSH_API_SECRET,
# VODPUSH_REQUEST (a JSON object of the command's fields).
# Prints the answer on success; exits 3 with "API error <code>: <message>" on a failure
# answer, 4 when HTTP itself fails (rest-client raises on 4xx/5xx).
require 'base64'
require 'json'
require 'openssl'
require 'rest-client'

def env(name)
  # The environment holds bytes; the test sends UTF-8.
  ENV.fetch(name, '').dup.force_encoding(Encoding::UTF_8)
end

request = {
  'command' => env('VODPUSH_COMMAND'),
  'api_key' => env('VODPUSH_API_KEY'),
  'timestamp' => Time.now.to_i,
  'cdn' => env('VODPUSH_CDN').to_i
}
fields = env('VODPUSH_REQUEST')
request.merge!(JSON.parse(fields.empty? ? '{}' : fields))

json = JSON.generate(request)
digest = OpenSSL::HMAC.digest('sha256', env('VODPUSH_API_SECRET'), json)
request['signature'] = Base64.strict_encode64(digest)

begin
  response = RestClient::Request.execute(
    method: :post,
    url: env('VODPUSH_URL'),
    payload: { json: JSON.generate(request), multipart: true },
    timeout: 20
  )
rescue RestClient::Exception, SocketError, SystemCallError => e
  # RestClient::ExceptionWithResponse for 4xx/5xx; the others when no answer came at all.
  warn "HTTP error: #{e.message}"
  exit 4
end

answer = JSON.parse(response.body)
if answer['status'] != 'success'
  warn "API error #{answer['code']}: #{answer['message']}"
  exit 3
end
puts response.body
