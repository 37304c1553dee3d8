"""Opening an API ``path`` (``sestore<N>/<username>/<file>``) as a file descriptor, without
ever leaving that user's directory, and without a race.

The user's directory is operator-made and opened normally. Below it the customer controls
everything (SFTP, rsync), including swapping a file for a symlink at any instant, so the
path is never handed to the kernel whole: each component is opened with ``openat`` and
``O_NOFOLLOW`` relative to a directory fd this walk already holds. A symlink met on the way
is read with ``readlinkat`` and resolved here, beneath the user's directory: ``..`` pops a
directory this walk opened (never the file system's ``..``), an absolute target must name a
place inside the user's directory. Whatever the customer swaps between two steps, every
step starts from an fd that is beneath the user's directory, so the file finally opened is
too. The caller then reads the open file, never the name (see docs/security-source.md).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections import deque
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MAX_COMPONENTS",
    "MAX_PATH_LENGTH",
    "Identity",
    "OpenFile",
    "PathRefused",
    "check",
    "open_plain",
    "open_source",
]

_STORE_RE = re.compile(r"sestore[0-9]{1,6}")
MAX_PATH_LENGTH = 4096  # characters in the API path, and bytes once encoded (PATH_MAX)
MAX_NAME_BYTES = 255  # NAME_MAX: one component
MAX_COMPONENTS = 64  # directories and file below the user's directory, as sent
MAX_SYMLINKS = 40  # Linux's own limit (ELOOP)
MAX_STEPS = 512  # components looked at, symlink targets included: bounds the work per open

# Directories: O_PATH needs only search permission, as path lookup does. The store and
# user directories are the operator's (followed if symlinks); below them, nothing is.
_HOME_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_FLAGS = _HOME_FLAGS | os.O_NOFOLLOW
# The file: O_NONBLOCK so that a FIFO cannot block the open (cleared once it is known to be
# a regular file); O_NOCTTY so that a terminal never becomes ours.
_FILE_FLAGS = (
    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
)
# Errors that may pass on their own (NFS, resource exhaustion): retried by the worker.
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.EINTR,
        errno.EAGAIN,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOMEM,
        errno.ETIMEDOUT,
        getattr(errno, "ESTALE", -1),
    }
)


class PathRefused(ValueError):
    """The path is malformed, leaves the user's directory, or names no regular file.

    ``transient``: the file system failed (I/O error, no file descriptors left), not the
    path; trying again later may work.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Identity:
    """What identifies one version of a file: a write, truncate, chmod, rename or unlink
    changes ctime (which, unlike mtime, no one can set back)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> Identity:
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    def difference(self, now: Identity) -> str | None:
        """How ``now`` differs from this identity, in words for a message; None if it does
        not. ctime catches what the rest misses: a rewrite of the same size whose mtime was
        set back (``touch -r``, ``os.utime``, rsync), a rename, an unlink."""
        if (now.dev, now.ino) != (self.dev, self.ino):
            return "another file has taken its name"
        if now.size != self.size:
            return "its size changed"
        if now.mtime_ns != self.mtime_ns:
            return "it was modified"
        if now != self:
            return "it was changed, renamed or removed"
        return None


class OpenFile:
    """A regular file opened for reading, with its identity when opened.

    ``path`` is how to name it in messages (the API path, never the operator's real
    directories); ``name`` is its own file name (for the content type). Read it with
    ``os.pread(file.fd, ...)``; close it (or use ``with``) when done.
    """

    def __init__(self, fd: int, *, path: str, name: str, identity: Identity) -> None:
        self.fd = fd
        self.path = path
        self.name = name
        self.identity = identity

    @property
    def size(self) -> int:
        return self.identity.size

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def changed(self) -> str | None:
        """How the open file differs from when it was opened, or None."""
        return self.identity.difference(Identity.of(os.fstat(self.fd)))

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> OpenFile:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OpenFile({self.path!r}, fd={self.fd})"


def check(root: Path, path: str, username: str, *, follow_symlinks: bool = True) -> None:
    """Refuse ``path`` (PathRefused) unless ``open_source`` would open it now."""
    open_source(root, path, username, follow_symlinks=follow_symlinks).close()


def open_source(root: Path, path: str, username: str, *, follow_symlinks: bool = True) -> OpenFile:
    """The regular file ``path`` names inside ``username``'s directory, opened; or
    PathRefused, for every way the path can be wrong (never another exception).

    Every check that can be made on the text is made before touching the file system.
    ``follow_symlinks``: follow symlinks that stay beneath the user's directory (the
    default); when False every symlink below the user's directory is refused.
    """
    store, owner, rest = _split(path, username)
    try:
        store_dir = os.fsencode(Path(root) / store)
        user_dir = os.path.join(store_dir, owner)
    except (UnicodeError, ValueError) as exc:  # an operator's root the OS cannot encode
        raise PathRefused(f"cannot open {path}: {exc}") from None
    try:
        store_fd = os.open(store_dir, _HOME_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise PathRefused(f"no such store: {store}") from None
        raise _refused(exc, path, store.encode()) from None
    try:
        # Operator-made, and may be a symlink the operator made: followed.
        user_fd = os.open(owner, _HOME_FLAGS, dir_fd=store_fd)
    except OSError as exc:
        raise _refused(exc, path, owner) from None
    finally:
        os.close(store_fd)
    try:
        # Where an absolute symlink target may point: the user's directory as the operator
        # named it, or its real path.
        try:
            homes = (os.path.abspath(user_dir), os.path.realpath(user_dir))
        except OSError as exc:  # no current directory any more, with a relative root
            raise _refused(exc, path, owner) from None
        fd, name = _walk(user_fd, rest, homes=homes, follow=follow_symlinks, path=path)
    finally:
        os.close(user_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PathRefused(f"not a regular file: {path} ({_kind(info.st_mode)})")
        os.set_blocking(fd, True)
    except OSError as exc:
        os.close(fd)
        raise _refused(exc, path, name) from None
    except BaseException:
        os.close(fd)
        raise
    return OpenFile(fd, path=path, name=name.decode("utf-8", "replace"), identity=Identity.of(info))


def open_plain(path: Path) -> OpenFile:
    """Open ``path`` as given, following symlinks: for files the operator names (tests, the
    benchmark, the uploader's library use), never for a customer's path. OSError as
    ``open`` raises it, or PathRefused when it is not a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PathRefused(f"not a regular file: {path} ({_kind(info.st_mode)})")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return OpenFile(fd, path=str(path), name=Path(path).name, identity=Identity.of(info))


# -- the text -------------------------------------------------------------------------------


def _split(path: str, username: str) -> tuple[str, bytes, list[bytes]]:
    """Store name, owner and the components below the owner, as bytes; or PathRefused."""
    if not isinstance(path, str) or not path:
        raise PathRefused("path is empty")
    if len(path) > MAX_PATH_LENGTH:
        raise PathRefused(f"path is longer than {MAX_PATH_LENGTH} characters")
    if "\x00" in path:
        raise PathRefused("path contains a NUL character")
    try:
        # Strict UTF-8: a lone surrogate ("\ud800" in JSON) names no file.
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        raise PathRefused("path is not valid Unicode text (it holds a lone surrogate)") from None
    if len(raw) > MAX_PATH_LENGTH:
        raise PathRefused(f"path is longer than {MAX_PATH_LENGTH} bytes in UTF-8")
    if path.startswith("/") or "\\" in path:
        raise PathRefused("path must be relative, as sestore<N>/<username>/<file>")
    parts = raw.split(b"/")
    if any(part in (b"", b".", b"..") for part in parts):
        raise PathRefused("path must not contain empty, '.' or '..' segments")
    if len(parts) < 3:
        raise PathRefused("path must look like sestore<N>/<username>/<file>")
    if len(parts) - 2 > MAX_COMPONENTS:
        raise PathRefused(
            f"path has more than {MAX_COMPONENTS} components below the user directory"
        )
    if any(len(part) > MAX_NAME_BYTES for part in parts):
        raise PathRefused(f"path has a segment longer than {MAX_NAME_BYTES} bytes")
    store = parts[0].decode()
    if not _STORE_RE.fullmatch(store):
        raise PathRefused(f"path must start with sestore<N>/, not {_text(parts[0])!r}")
    if parts[1] != username.encode("utf-8", "surrogateescape"):
        raise PathRefused("path must be inside your own user directory")
    return store, parts[1], parts[2:]


# -- the walk -------------------------------------------------------------------------------


def _walk(
    user_fd: int, parts: list[bytes], *, homes: tuple[bytes, ...], follow: bool, path: str
) -> tuple[int, bytes]:
    """Open ``parts`` below ``user_fd``, one component at a time: (fd, its file name).

    ``stack`` holds the directories walked into, ``user_fd`` first (not ours to close);
    ``..`` pops it and may not pop the user's directory itself.
    """
    stack = [user_fd]
    todo = deque(parts)
    links = steps = 0
    try:
        while todo:
            steps += 1
            if steps > MAX_STEPS:
                raise PathRefused(f"path takes more than {MAX_STEPS} steps to resolve: {path}")
            name = todo.popleft()
            if name in (b"", b"."):
                continue
            if name == b"..":
                if len(stack) == 1:
                    raise PathRefused("path resolves outside your user directory")
                os.close(stack.pop())
                continue
            last = not todo
            try:
                fd = os.open(name, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=stack[-1])
            except OSError as exc:
                # A symlink refuses O_NOFOLLOW: ELOOP for the file, ENOTDIR with O_DIRECTORY.
                if exc.errno == errno.ENXIO:  # a socket: say so
                    raise PathRefused(
                        f"not a regular file: {path} ({_kind_at(name, stack[-1])})"
                    ) from None
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise _refused(exc, path, name) from None
                target = _readlink(name, stack[-1], path)
                if target is None:  # not a symlink (any more: swapped meanwhile)
                    if exc.errno == errno.ENOTDIR:
                        raise PathRefused(
                            f"no such file: {path} ({_text(name)!r} is not a directory)"
                        ) from None
                    todo.appendleft(name)  # look again; bounded by MAX_STEPS
                    continue
                if not follow:
                    raise PathRefused(
                        f"path component {_text(name)!r} is a symbolic link, which this "
                        "server does not follow: name the file itself"
                    ) from None
                links += 1
                if links > MAX_SYMLINKS:
                    raise PathRefused(f"too many levels of symbolic links: {path}") from None
                if target.startswith(b"/"):
                    below = _below(target, homes)
                    if below is None:
                        raise PathRefused("path resolves outside your user directory") from None
                    while len(stack) > 1:
                        os.close(stack.pop())
                    target = below
                todo.extendleft(reversed(target.split(b"/")))
                continue
            if last:
                return fd, name
            if len(stack) > MAX_COMPONENTS:
                os.close(fd)
                raise PathRefused(f"path is more than {MAX_COMPONENTS} directories deep: {path}")
            stack.append(fd)
        # The path ended on a directory (a symlink to "." or "dir/", say).
        raise PathRefused(f"not a regular file: {path} (a directory)")
    finally:
        for fd in stack[1:]:
            os.close(fd)


def _readlink(name: bytes, dir_fd: int, path: str) -> bytes | None:
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise _refused(exc, path, name) from None


def _below(target: bytes, homes: tuple[bytes, ...]) -> bytes | None:
    """What is left of an absolute ``target`` once the user's directory is taken off its
    front, or None when it does not start with the user's directory."""
    for home in homes:
        home = home.rstrip(b"/")
        if target == home or target.startswith(home + b"/"):
            return target[len(home) :]
    return None


# -- messages -------------------------------------------------------------------------------


def _text(name: bytes) -> str:
    """A name for a message: bounded, any byte readable."""
    text = name.decode("utf-8", "backslashreplace")
    return text if len(text) <= 80 else text[:77] + "..."


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return kind
    return "not a file"


def _kind_at(name: bytes, dir_fd: int) -> str:
    """What ``name`` is, for a message only (the decision was made on the open)."""
    try:
        return _kind(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return "it cannot be opened"


def _refused(exc: OSError, path: str, name: bytes) -> PathRefused:
    """The PathRefused for an OSError met while opening ``name`` on the way to ``path``."""
    code = exc.errno
    if code == errno.ENOENT:
        return PathRefused(f"no such file: {path}")
    if code == errno.ENOTDIR:
        return PathRefused(f"no such file: {path} ({_text(name)!r} is not a directory)")
    if code in (errno.EACCES, errno.EPERM):
        return PathRefused(f"permission denied: {path}")
    if code == errno.ENXIO:  # a socket (or a device with nothing behind it)
        return PathRefused(f"not a regular file: {path} ({_text(name)!r} cannot be opened)")
    if code == errno.ELOOP:
        return PathRefused(f"too many levels of symbolic links: {path}")
    if code == errno.ENAMETOOLONG:
        return PathRefused(f"path has a segment that is too long: {path}")
    if code in _TRANSIENT_ERRNOS:
        return PathRefused(f"cannot open {path} now: {exc.strerror}", transient=True)
    return PathRefused(f"cannot open {path}: {exc.strerror or exc}")
