"""Private state: folders and files that only the server's own user can touch.

Everything a server shares between its processes (the ring, its lock files, the config
snapshot, the shipper's counters and log) lives in a folder of this user's alone, so that
another local user can neither read captured requests nor plant a file, a link or a FIFO
where a process of ours would open it. Shared folders such as /dev/shm are world-writable,
so nothing here trusts a name: a folder is used only after `lstat` shows a real folder owned
by the effective user with no group or other permission bits; a file is opened without
following links (`O_NOFOLLOW`), without blocking on a FIFO (`O_NONBLOCK`), and used only after
`fstat` shows a regular file of ours with mode 0600 or stricter. A file is created exclusively
(`O_EXCL`) with mode 0600; replaced through a temporary file of an unpredictable name
(`mkstemp`) and an atomic rename; read with a size cap.

Each refusal raises `UnsafePathError` (an `OSError`, so callers that already handle I/O
errors handle it) naming the path, what is wrong with it and what to do.

Knows nothing of Django or HTTP.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile

PRIVATE_FOLDER_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
_SAFE_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class UnsafePathError(OSError):
    """A path that holds something this process must not use: not ours, a link, shared
    with other users, or not the kind of object expected."""


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "a special file"


def _problem(status: os.stat_result, want_folder: bool) -> str | None:
    """What makes `status` unusable as a private folder (or file), or None."""
    expected = stat.S_ISDIR if want_folder else stat.S_ISREG
    if not expected(status.st_mode):
        return f"is {_kind(status.st_mode)}, not {'a folder' if want_folder else 'a file'}"
    if status.st_uid != os.geteuid():
        return f"belongs to uid {status.st_uid}, not to this process's uid {os.geteuid()}"
    if status.st_mode & 0o077:
        return (f"has mode {stat.S_IMODE(status.st_mode):04o}: other users may use it "
                f"(expected {PRIVATE_FOLDER_MODE if want_folder else PRIVATE_FILE_MODE:04o})")
    return None


def check_folder(path: str) -> None:
    """Raise UnsafePathError unless `path` is a real folder of ours that only we can use."""
    problem = _problem(os.lstat(path), want_folder=True)
    if problem:
        raise UnsafePathError(f"{path} {problem}. moesif_fast keeps its shared state only in "
                              "a folder that is this user's alone: remove what is there, or "
                              "set RING_DIR to another folder")


def make_folder(path: str) -> str:
    """Create `path` with mode 0700 unless it exists, then check it (`check_folder`). The
    folder it is in must exist. Returns `path`."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, PRIVATE_FOLDER_MODE)
    check_folder(path)
    return path


def check_file(fd: int, path: str) -> os.stat_result:
    """Raise UnsafePathError unless the open file `fd` (at `path`) is a regular file of ours
    with no group or other permission bits. Returns its status."""
    status = os.fstat(fd)
    problem = _problem(status, want_folder=False)
    if problem:
        raise UnsafePathError(f"{path} {problem}; moesif_fast does not use it. Remove it (and "
                              "find out who put it there)")
    return status


def open_file(path: str, flags: int, *, create: bool = False, exclusive: bool = False) -> int:
    """Open `path` (os.open `flags`, e.g. O_RDWR) without following a link or blocking on a
    FIFO, and check it (`check_file`). `create`: create it (mode 0600) if missing;
    `exclusive`: it must not exist. Returns the descriptor, in blocking mode."""
    if create or exclusive:
        flags |= os.O_CREAT | (os.O_EXCL if exclusive else 0)
    try:
        fd = os.open(path, flags | _SAFE_OPEN, PRIVATE_FILE_MODE)
    except OSError as error:
        if error.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise UnsafePathError(f"{path} is a symbolic link; moesif_fast does not follow "
                                  "links in its state folder. Remove it") from None
        raise
    try:
        check_file(fd, path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_file(path: str, limit: int) -> bytes:
    """The content of the private file at `path`; UnsafePathError if it is not one, or larger
    than `limit` bytes."""
    fd = open_file(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise UnsafePathError(f"{path} is {size} bytes, more than the {limit} expected; "
                                  "it is not used")
        chunks, remaining = [], limit + 1
        while remaining > 0 and (chunk := os.read(fd, remaining)):
            chunks.append(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise UnsafePathError(f"{path} grew past {limit} bytes while read; it is not used")
    return data


def replace_file(path: str, data: bytes) -> None:
    """Replace the file at `path` with `data` atomically: written to a new file of an
    unpredictable name (mode 0600) in the same folder, then renamed over `path`. Whatever was
    at `path` is replaced, never followed or written through; a folder there is an error."""
    folder, name = os.path.split(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp",
                                             dir=folder or ".")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def remove_file(path: str) -> bool:
    """Unlink `path` if it is a regular file of ours (a link is removed as a link, never
    followed). True if something was removed."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return False
    if _problem(status, want_folder=False):
        return False
    os.unlink(path)
    return True
