"""The wire protocol: request parsing, signing and the response envelope."""
