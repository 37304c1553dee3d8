<?php
// The example client from the aws.status reference page, unchanged but for the URL, the keys
// and the request fields, which come from the environment (VODPUSH_REQUEST: a JSON object of
// extra fields, decoded to a PHP array exactly as an integration would build it).
$request = array(
    'command' => getenv('VODPUSH_COMMAND'),
    'api_key' => getenv('VODPUSH_API_KEY'),
    'timestamp' => time(),
    'cdn' => (int) getenv('VODPUSH_CDN'),
);
$extra = json_decode(getenv('VODPUSH_REQUEST') ?: '{}', true);
foreach ($extra as $k => $v) {
    $request[$k] = $v;
}

//Create request signature
$json_request = json_encode($request);
$sig = base64_encode(hash_hmac('sha256', $json_request, getenv('VODPUSH_API_SECRET'), true));
$request['signature'] = $sig;
$json_request = json_encode($request);
$ch = curl_init();
curl_setopt($ch, CURLOPT_URL, getenv('VODPUSH_URL')); // Set the URL
curl_setopt($ch, CURLOPT_POST, true); // Perform a POST
curl_setopt($ch, CURLOPT_RETURNTRANSFER, true); // If not set, curl prints output to the browser
curl_setopt($ch, CURLOPT_HEADER, false); // If set, curl returns headers as part of the data stream
curl_setopt($ch, CURLOPT_POSTFIELDS, array('json' => $json_request)); //'Json' string or 'PHP' serialized return
$response = curl_exec($ch); //Execute the API Call
if (!$response) {
    die('Failed to connect to ScaleEngine API');
}
//Decode the response as an associative array
$arrResponse = json_decode($response, true);
if ($arrResponse) {
    //Operation completed successfully
    echo json_encode($arrResponse);
} else {
    //Operation failed
    echo 'An error occured processing your request:';
    print_r($response);
    exit(1);
}
