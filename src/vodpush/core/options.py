"""The values an S3 object option may take, each list defined once."""

from __future__ import annotations

MAX_KEY_BYTES = 1024  # S3's limit on an object key, in UTF-8

# The ACLs aws.upload accepts (the reference API's two).
API_ACLS = ("private", "public-read")
# S3's canned ACLs: what the upload engine accepts (library use may ask for any of them).
CANNED_ACLS = (
    "private",
    "public-read",
    "public-read-write",
    "authenticated-read",
    "aws-exec-read",
    "bucket-owner-read",
    "bucket-owner-full-control",
)
# Server-side encryption an account may ask for; a KMS key id goes only with SSE_KMS.
SSE_KMS = "aws:kms"
SSE_CHOICES = ("AES256", SSE_KMS)
