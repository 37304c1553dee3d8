"""Files that hold secrets (the SQLite database, the key file) are readable by their owner
only: created 0600, and tightened at start when an older install left them looser."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_MODE = 0o600


def create_private(path: Path) -> bool:
    """Create ``path`` empty with mode 0600 unless it exists; True if this call created it.

    O_EXCL: when another process wins the race, its file (created the same way) is kept.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def restrict_to_owner(path: Path, what: str) -> None:
    """Remove group and other permissions from an existing ``path`` (a warning says so).

    A file this process may not chmod (another owner) is left as it is, with a warning.
    """
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if not mode & 0o077:
        return
    try:
        os.chmod(path, mode & 0o700)
    except OSError as exc:
        log.warning(
            "%s %s is readable by other users and cannot be restricted: %s",
            what,
            path,
            exc.strerror,
            extra={"action": "file.mode_loose", "path": str(path), "mode": oct(mode)},
        )
        return
    log.warning(
        "%s %s was readable by other users (mode %s): restricted to its owner",
        what,
        path,
        oct(mode),
        extra={
            "action": "file.mode_restricted",
            "path": str(path),
            "mode": oct(mode),
            "new_mode": oct(mode & 0o700),
        },
    )
