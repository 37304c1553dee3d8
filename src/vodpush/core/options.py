"""The values an S3 object option may take, each list and each rule defined once: the API
checks a customer's values with these at submit (operations.upload), the upload engine
checks them again when it builds an object's options (transfer.options)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

MAX_KEY_BYTES = 1024  # S3's limit on an object key, in UTF-8

# No ACL at all: the bucket decides (ACLs disabled, Cloudflare R2, Backblaze B2...).
BUCKET_DEFAULT_ACL = "bucket-default"
# The ACLs aws.upload accepts: the reference API's two, then ours. "private" and
# "bucket-default" both send no ACL header (transfer.options says why); they differ in what
# the customer asked for, which the record keeps.
API_ACLS = ("private", "public-read", BUCKET_DEFAULT_ACL)
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

# -- the object options aws.upload adds to the reference API --------------------------------

# The optional aws.upload fields stored in a request's options (NewRequest.options), each
# handed to the upload engine as the ObjectOptions field of the same name.
REQUEST_OPTIONS = ("content_type", "storage_class", "tags", "cache_control", "content_disposition")

# S3's storage classes that an upload may ask for (PutObject's x-amz-storage-class, as in
# botocore's S3 model). Left out: AWS_BACKUP_WARM and AWS_BACKUP_LOW_COST_WARM, the classes
# AWS Backup gives objects it stores itself. A class the bucket cannot take (OUTPOSTS away
# from Outposts, EXPRESS_ONEZONE outside a directory bucket) is S3's to refuse at upload.
STORAGE_CLASSES = (
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER",
    "DEEP_ARCHIVE",
    "GLACIER_IR",
    "OUTPOSTS",
    "SNOW",
    "EXPRESS_ONEZONE",
    "FSX_OPENZFS",
    "FSX_ONTAP",
)

# Object tags, as S3 allows them: at most 10 a object, keys of 1-128 and values of 0-256
# Unicode characters; letters, digits, white space and + - = . _ : / @; no key starting
# with the reserved "aws:".
MAX_TAGS = 10
MAX_TAG_KEY_CHARS = 128
MAX_TAG_VALUE_CHARS = 256
_TAG_PUNCTUATION = frozenset("+-=._:/@")
# Unicode categories of the letters (L*), digits and numbers (N*) and spaces (Zs) a tag may
# hold; no control, format or combining character.
_TAG_CATEGORIES = frozenset({"Lu", "Ll", "Lt", "Lm", "Lo", "Nd", "Nl", "No", "Zs"})
RESERVED_TAG_PREFIX = "aws:"

# Header values: bounds of our own (S3 takes about 8 KB of headers in all).
MAX_CONTENT_TYPE_CHARS = 255
MAX_HEADER_VALUE_CHARS = 1024

# A media type (RFC 9110 8.3.1): type "/" subtype, each an RFC 9110 token, then
# parameters "; name=value" whose value is a token or a quoted string (printable ASCII).
_TCHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_MEDIA_TYPE = re.compile(
    rf"{_TCHARS}/{_TCHARS}(?:[ \t]*;[ \t]*{_TCHARS}=(?:{_TCHARS}|{_QUOTED}))*[ \t]*"
)
_DISPOSITION = re.compile(rf"{_TCHARS}(?:[ \t]*;.*)?")


def printable_ascii(text: str) -> bool:
    """Only characters 0x20-0x7E: nothing a header (or a log line) could be split with."""
    return all(" " <= c <= "~" for c in text)


def refuse_header_value(value: Any, max_chars: int = MAX_HEADER_VALUE_CHARS) -> str | None:
    """Why ``value`` cannot be sent as an HTTP header value, or None."""
    if not isinstance(value, str):
        return "must be a string"
    if not value.strip():
        return "must not be empty"
    if len(value) > max_chars:
        return f"must be at most {max_chars} characters"
    if not printable_ascii(value):
        return "must be printable ASCII (no control characters, no non-ASCII letters)"
    return None


def refuse_content_type(value: Any) -> str | None:
    why = refuse_header_value(value, MAX_CONTENT_TYPE_CHARS)
    if why is None and not _MEDIA_TYPE.fullmatch(value):
        why = "must be a media type such as video/mp4 or text/plain; charset=utf-8"
    return why


def refuse_content_disposition(value: Any) -> str | None:
    """A disposition type (inline, attachment) and parameters; a file name that is not
    ASCII goes in RFC 6266's filename*=UTF-8''<percent-encoded> form."""
    why = refuse_header_value(value)
    if why is None and not _DISPOSITION.fullmatch(value):
        why = "must start with a disposition type such as attachment or inline"
    return why


def refuse_storage_class(value: Any) -> str | None:
    if value in STORAGE_CLASSES:
        return None
    return f"must be one of {', '.join(STORAGE_CLASSES)}"


def _tag_text(text: str) -> bool:
    # Letters and digits of any script, white space (not line breaks), the punctuation.
    return all(c in _TAG_PUNCTUATION or unicodedata.category(c) in _TAG_CATEGORIES for c in text)


def refuse_tags(tags: Any) -> str | None:
    """Why ``tags`` (a mapping of strings) is not a tag set S3 takes, or None."""
    if not isinstance(tags, Mapping):
        return "must be an object of key/value pairs"
    if len(tags) > MAX_TAGS:
        return f"has {len(tags)} tags; S3 allows at most {MAX_TAGS}"
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            return "keys and values must be strings"
        if not 1 <= len(key) <= MAX_TAG_KEY_CHARS:
            return f"key {key[:40]!r} must be 1-{MAX_TAG_KEY_CHARS} characters"
        if len(value) > MAX_TAG_VALUE_CHARS:
            return f"value of {key!r} must be at most {MAX_TAG_VALUE_CHARS} characters"
        if key.lower().startswith(RESERVED_TAG_PREFIX):  # in any case, to be safe
            return f"key {key!r} starts with {RESERVED_TAG_PREFIX!r}, which S3 reserves"
        if not _tag_text(key):
            return f"key {key!r} may hold only letters, digits, spaces and + - = . _ : / @"
        if not _tag_text(value):
            return f"value of {key!r} may hold only letters, digits, spaces and + - = . _ : / @"
    return None


def tagging_header(tags: Mapping[str, str]) -> str:
    """The tags as PutObject's Tagging argument (x-amz-tagging): a URL query string,
    everything but letters, digits and _ . - ~ percent-encoded (a space as %20, never '+',
    so that no reader can take one for the other)."""
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in tags.items())
