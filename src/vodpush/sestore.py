"""Resolving an API ``path`` (``sestore<N>/<username>/<file>``) to a file on disk, without
ever leaving that user's directory."""

from __future__ import annotations

import os
import re
from pathlib import Path

_STORE_RE = re.compile(r"^sestore[0-9]{1,6}$")
MAX_PATH_LENGTH = 4096


class PathRefused(ValueError):
    """The path is malformed, escapes the user's directory, or names no file."""


def resolve(root: Path, path: str, username: str) -> Path:
    """The real path of the file ``path`` names for ``username``, or PathRefused.

    Every check that can be made on the text is made before touching the file system; then
    the real path (all symlinks followed) must stay inside the user's own directory.
    """
    if not path:
        raise PathRefused("path is empty")
    if len(path) > MAX_PATH_LENGTH:
        raise PathRefused(f"path is longer than {MAX_PATH_LENGTH} characters")
    if "\x00" in path:
        raise PathRefused("path contains a NUL character")
    if path.startswith("/") or "\\" in path:
        raise PathRefused("path must be relative, as sestore<N>/<username>/<file>")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise PathRefused("path must not contain empty, '.' or '..' segments")
    if len(parts) < 3:
        raise PathRefused("path must look like sestore<N>/<username>/<file>")
    store, owner, rest = parts[0], parts[1], parts[2:]
    if not _STORE_RE.match(store):
        raise PathRefused(f"path must start with sestore<N>/, not {store!r}")
    if owner != username:
        raise PathRefused("path must be inside your own user directory")

    store_dir = Path(root) / store
    if not store_dir.is_dir():
        raise PathRefused(f"no such store: {store}")
    user_dir = Path(os.path.realpath(store_dir / owner))
    if not user_dir.is_dir():
        raise PathRefused(f"no such file: {path}")
    target = Path(os.path.realpath(user_dir.joinpath(*rest)))
    if target == user_dir or not target.is_relative_to(user_dir):
        raise PathRefused("path resolves outside your user directory")
    if not target.exists():
        raise PathRefused(f"no such file: {path}")
    if not target.is_file():
        raise PathRefused(f"not a regular file: {path}")
    return target
