<?php
// Call the vodpush API from PHP, signed as docs/api.md#signing says (the reference page's
// code, once):
//
//     require 'docs/examples/vodpush.php';
//     $answer = vodpush_call('aws.status', array('limit' => 5));
//     if ($answer['status'] == 'success') { ... $answer['data'] ... }
//     else { echo $answer['code'], ' ', $answer['message'], "\n"; }
//
// The envelope comes from VODPUSH_API_KEY and VODPUSH_CDN, the request is signed with
// VODPUSH_API_SECRET and POSTed to VODPUSH_URL. Returns the decoded answer, success or
// failure alike; throws RuntimeException when no answer came.

function vodpush_call($command, $fields = array())
{
    $request = array_merge(array(
        'command' => $command,
        'api_key' => getenv('VODPUSH_API_KEY'),
        'timestamp' => time(),
        'cdn' => (int) getenv('VODPUSH_CDN'),
    ), $fields);
    // base64 HMAC-SHA256 of the JSON text, keyed with the API secret, added as the last member.
    $json_request = json_encode($request);
    $request['signature'] = base64_encode(
        hash_hmac('sha256', $json_request, getenv('VODPUSH_API_SECRET'), true)
    );
    $ch = curl_init();
    curl_setopt($ch, CURLOPT_URL, getenv('VODPUSH_URL'));
    curl_setopt($ch, CURLOPT_POST, true);
    curl_setopt($ch, CURLOPT_RETURNTRANSFER, true);
    curl_setopt($ch, CURLOPT_POSTFIELDS, array('json' => json_encode($request)));
    $response = curl_exec($ch);
    if ($response === false) {
        throw new RuntimeException('vodpush: no answer: ' . curl_error($ch));
    }
    $answer = json_decode($response, true);
    if (!is_array($answer) || !isset($answer['status'])) {
        $http = curl_getinfo($ch, CURLINFO_HTTP_CODE);
        throw new RuntimeException("vodpush: HTTP $http, not an API answer: " . substr($response, 0, 200));
    }
    return $answer;
}
