#!/usr/bin/perl
# A ScaleEngine API client written the way Perl integrations do it: LWP::UserAgent posting
# a urlencoded `json` field, JSON::PP's encode_json (canonical off: random key order, '/' not
# escaped, raw UTF-8), Digest::SHA's unpadded base64 padded by hand, and the signature
# appended to the JSON text with a regex.
#
# Environment: VODPUSH_URL, VODPUSH_COMMAND, VODPUSH_CDN, VODPUSH_API_KEY, VODPUSH_API_SECRET,
# VODPUSH_REQUEST (a JSON object of the command's fields).
# Prints the answer on success; exits 3 with "API error <code>: <message>" on a failure
# answer, 4 when HTTP itself fails.
use strict;
use warnings;
use Digest::SHA qw(hmac_sha256_base64);
use JSON::PP qw(encode_json decode_json);
use LWP::UserAgent;

my %request = (
    command   => $ENV{VODPUSH_COMMAND},
    api_key   => $ENV{VODPUSH_API_KEY},
    timestamp => time(),
    cdn       => $ENV{VODPUSH_CDN},    # a string, as Perl has it: "158"
);
my $fields = decode_json($ENV{VODPUSH_REQUEST} || '{}');
$request{$_} = $fields->{$_} for keys %$fields;

my $json = encode_json(\%request);
my $sig  = hmac_sha256_base64($json, $ENV{VODPUSH_API_SECRET});
while (length($sig) % 4) {
    $sig .= '=';
}
$json =~ s/}$/,"signature":"$sig"}/;

my $ua       = LWP::UserAgent->new(timeout => 20);
my $response = $ua->post($ENV{VODPUSH_URL}, { json => $json });
if (!$response->is_success) {
    print STDERR "HTTP error: ", $response->status_line, "\n";
    exit 4;
}
my $answer = decode_json($response->content);
if ($answer->{status} ne 'success') {
    binmode STDERR, ':encoding(UTF-8)';
    print STDERR "API error $answer->{code}: $answer->{message}\n";
    exit 3;
}
print $response->content, "\n";
