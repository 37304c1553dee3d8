"""Encryption of secrets at rest (API secrets, S3 secret keys) with a Fernet key."""

from __future__ import annotations

import logging
import os
import secrets
import string
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from vodpush.config import Settings

log = logging.getLogger(__name__)

_KEY_ALPHABET = string.ascii_uppercase + string.digits


class SecretBox:
    """Encrypts and decrypts short secrets; the key never leaves this object."""

    def __init__(self, key: str | bytes) -> None:
        try:
            self._fernet = Fernet(key)
        except (ValueError, TypeError) as exc:
            raise ValueError(
                "VODPUSH_SECRET_KEY must be a Fernet key (32 url-safe base64-encoded bytes); "
                "make one with `vodpush keygen`"
            ) from exc

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except InvalidToken as exc:
            raise ValueError(
                "cannot decrypt a stored secret: VODPUSH_SECRET_KEY differs from the key "
                "that encrypted it"
            ) from exc

    def __repr__(self) -> str:
        return "SecretBox(key=**********)"


def generate_key() -> str:
    return Fernet.generate_key().decode("ascii")


def load_secret_box(settings: Settings) -> SecretBox:
    """The configured key, or the one in ``secret_key_file``, created on first run."""
    if settings.secret_key is not None:
        return SecretBox(settings.secret_key.get_secret_value())
    path = Path(settings.secret_key_file)
    if path.exists():
        return SecretBox(path.read_text().strip())
    key = generate_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Create with 0600 from the start so the key is never readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    log.warning(
        "VODPUSH_SECRET_KEY is not set: generated a new key into %s. Back it up; every "
        "process that shares this database needs the same key.",
        path,
        extra={"action": "secret_key.generated"},
    )
    return SecretBox(key)


def new_api_key() -> str:
    """32 characters of [A-Z0-9], like ScaleEngine's keys."""
    return "".join(secrets.choice(_KEY_ALPHABET) for _ in range(32))


def new_api_secret() -> str:
    """64 hex characters (256 bits), like ScaleEngine's secrets."""
    return secrets.token_hex(32)
