"""Encryption of secrets at rest (API secrets, S3 secret keys) with Fernet keys.

Several keys may be configured at once so that they can be rotated without downtime: the
first one encrypts, every one decrypts (:class:`cryptography.fernet.MultiFernet`). They come
from ``VODPUSH_SECRET_KEY`` (comma-separated) or from the key file ``VODPUSH_SECRET_KEY_FILE``
(one key per line, newest first). A process whose keys come from the file re-reads the file
when it meets a secret none of its keys can decrypt, or before it encrypts, so processes
that run while ``vodpush secrets rotate-key`` rewrites the file keep working.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import secrets
import string
import threading
from collections.abc import Sequence
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from vodpush.config import Settings
from vodpush.filemodes import PRIVATE_MODE, restrict_to_owner

log = logging.getLogger(__name__)

_KEY_ALPHABET = string.ascii_uppercase + string.digits


class KeyConfigError(ValueError):
    """A key list that cannot be used; the message says why (never the key itself)."""


def parse_keys(text: str, origin: str) -> list[str]:
    """The keys in ``text``: separated by commas or new lines, blank lines and ``#`` comment
    lines ignored, duplicates dropped (the first place wins). Each must be a Fernet key."""
    keys: list[str] = []
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        for part in line.split(","):
            key = part.strip()
            if key and key not in keys:
                keys.append(key)
    if not keys:
        raise KeyConfigError(f"{origin} holds no key")
    for position, key in enumerate(keys, 1):
        try:
            Fernet(key)
        except (ValueError, TypeError):
            raise KeyConfigError(
                f"{origin}: key {position} is not a Fernet key (32 url-safe base64-encoded "
                "bytes); make one with `vodpush keygen`"
            ) from None
    return keys


def fingerprint(key: str) -> str:
    """A short name for a key that reveals nothing of it (for logs and the operator)."""
    return hashlib.sha256(key.encode("ascii")).hexdigest()[:12]


# -- the key file ----------------------------------------------------------------------------


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def read_key_file(path: Path) -> list[str]:
    return parse_keys(path.read_text(encoding="ascii"), f"key file {path}")


def write_key_file(path: Path, keys: Sequence[str]) -> None:
    """Replace the key file atomically: a 0600 temporary file beside it, written and fsynced,
    renamed over it, and the directory fsynced; a crash leaves the old file or the new one."""
    if not keys:
        raise KeyConfigError("refusing to write a key file without keys")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by an earlier crash of a process that had our pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write("".join(key + "\n" for key in keys))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def stale_temp_files(path: Path) -> list[Path]:
    """Temporary key files a killed rotation left beside ``path``."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


# -- the box ---------------------------------------------------------------------------------


class SecretBox:
    """Encrypts and decrypts short secrets; the keys never leave this object.

    ``keys``: one key or a list, the first encrypts. ``key_file``: where the keys came from,
    re-read when it changes (see the module docstring).
    """

    def __init__(self, keys: str | bytes | Sequence[str], *, key_file: Path | None = None):
        if isinstance(keys, bytes):
            keys = keys.decode("ascii")
        if isinstance(keys, str):
            keys = parse_keys(keys, "VODPUSH_SECRET_KEY")
        self._key_file = key_file
        self._file_seen = _file_identity(key_file) if key_file is not None else None
        self._lock = threading.Lock()
        self._set_keys(list(keys))

    def _set_keys(self, keys: list[str]) -> None:
        if not keys:
            raise KeyConfigError("at least one key is needed")
        try:
            fernets = [Fernet(key) for key in keys]
        except (ValueError, TypeError) as exc:
            raise KeyConfigError(
                "VODPUSH_SECRET_KEY must be a Fernet key (32 url-safe base64-encoded bytes); "
                "make one with `vodpush keygen`"
            ) from exc
        # One tuple, swapped in one assignment: readers in other threads see old or new.
        self._state = (MultiFernet(fernets), fernets, [fingerprint(k) for k in keys])

    @property
    def fingerprints(self) -> list[str]:
        """The keys' fingerprints, the encrypting one first."""
        return list(self._state[2])

    def reload(self) -> bool:
        """Re-read the key file if it changed since it was read; True if the keys changed."""
        if self._key_file is None:
            return False
        with self._lock:
            seen = _file_identity(self._key_file)
            if seen is None or seen == self._file_seen:
                return False
            try:
                keys = read_key_file(self._key_file)
            except (OSError, ValueError) as exc:
                # Mid-edit by hand, or unreadable: keep the keys we have.
                log.warning(
                    "cannot re-read the key file: %s",
                    exc,
                    extra={"action": "secret_key.reload_failed", "path": str(self._key_file)},
                )
                return False
            before = self.fingerprints
            self._set_keys(keys)
            self._file_seen = seen
        if before != self.fingerprints:
            log.info(
                "re-read the key file",
                extra={
                    "action": "secret_key.reloaded",
                    "path": str(self._key_file),
                    "keys": self.fingerprints,
                },
            )
            return True
        return False

    def encrypt(self, plaintext: str) -> str:
        self.reload()  # a stat: encrypt with the newest key even in a long-running process
        return self._state[0].encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        data = token.encode("ascii")
        try:
            return self._state[0].decrypt(data).decode("utf-8")
        except InvalidToken:
            if self.reload():
                with contextlib.suppress(InvalidToken):
                    return self._state[0].decrypt(data).decode("utf-8")
        raise ValueError(
            "cannot decrypt a stored secret: none of the configured keys (VODPUSH_SECRET_KEY "
            "or the key file) is the key that encrypted it"
        )

    def key_index(self, token: str) -> int | None:
        """The position of the key that decrypts ``token`` (0: the encrypting key), or None."""
        data = token.encode("ascii")
        for index, fernet in enumerate(self._state[1]):
            try:
                fernet.decrypt(data)
            except InvalidToken:
                continue
            return index
        return None

    def rotate(self, token: str) -> str:
        """``token`` re-encrypted with the first key (decrypted with whichever key can)."""
        try:
            return self._state[0].rotate(token.encode("ascii")).decode("ascii")
        except InvalidToken:
            raise ValueError("cannot decrypt a stored secret with any configured key") from None

    def __repr__(self) -> str:
        return f"SecretBox(keys={len(self._state[1])}, **********)"


def generate_key() -> str:
    return Fernet.generate_key().decode("ascii")


def load_secret_box(settings: Settings) -> SecretBox:
    """The configured keys, or those in ``secret_key_file``, created on first run."""
    if settings.secret_key is not None:
        return SecretBox(parse_keys(settings.secret_key.get_secret_value(), "VODPUSH_SECRET_KEY"))
    path = Path(settings.secret_key_file)
    if path.exists():
        restrict_to_owner(path, "key file")
        return SecretBox(read_key_file(path), key_file=path)
    key = generate_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Create with 0600 from the start so the key is never readable by others.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    except FileExistsError:
        # Another process started at the same moment and wrote its key first: use that one.
        return SecretBox(read_key_file(path), key_file=path)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    log.warning(
        "VODPUSH_SECRET_KEY is not set: generated a new key into %s. Back it up; every "
        "process that shares this database needs the same key.",
        path,
        extra={"action": "secret_key.generated"},
    )
    return SecretBox([key], key_file=path)


def new_api_key() -> str:
    """32 characters of [A-Z0-9], like ScaleEngine's keys."""
    return "".join(secrets.choice(_KEY_ALPHABET) for _ in range(32))


def new_api_secret() -> str:
    """64 hex characters (256 bits), like ScaleEngine's secrets."""
    return secrets.token_hex(32)


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")
