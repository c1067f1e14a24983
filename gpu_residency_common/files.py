"""Every file read from a shared directory, and every file we write, goes through here.

Registry entries, gate records and events are written by other programs (frameworks,
often as another user, sometimes from another container), so a reader treats each as
hostile: no symlinks (O_NOFOLLOW), regular files only (a FIFO would block the reader;
the open is non-blocking and the type checked on the open descriptor, not before it),
a bounded read and a bounded JSON depth. Writers create files 0644 and directories 0755
whatever the umask, so a capability-less reader running as another user can read them,
and never follow a symlink planted where the file should be.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FILE_MODE = 0o644
DIR_MODE = 0o755
MAX_JSON_DEPTH = 32

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


class UntrustedFileError(ValueError):
    """A file that was refused; `reason` is a short label value for error counters."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # missing | refused | too_large | unreadable | malformed


@dataclass(frozen=True)
class FileData:
    data: bytes
    inode: int
    size: int  # the file's size when it was read (may exceed len(data) for a partial read)
    mtime_ns: int


@contextlib.contextmanager
def open_regular(path: str | os.PathLike, flags: int = _READ_FLAGS, mode: int = FILE_MODE) -> Iterator[int]:
    """A descriptor of a regular file at `path`, never through a symlink and never blocking on a FIFO."""
    try:
        fd = os.open(path, flags, mode)
    except FileNotFoundError:
        raise UntrustedFileError("missing", f"{path}: no such file") from None
    except OSError as exc:
        # ELOOP: a symlink; ENXIO: a FIFO opened for writing without a reader.
        reason = "refused" if exc.errno in (errno.ELOOP, errno.ENXIO) else "unreadable"
        raise UntrustedFileError(reason, f"{path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UntrustedFileError("refused", f"{path}: not a regular file")
        yield fd
    finally:
        os.close(fd)


def read_untrusted(path: str | os.PathLike, max_bytes: int, offset: int = 0, partial: bool = False) -> FileData:
    """Up to `max_bytes` from `offset`; a larger remainder is refused unless `partial` (then it is cut)."""
    with open_regular(path) as fd:
        info = os.fstat(fd)
        if not partial and info.st_size - offset > max_bytes:
            raise UntrustedFileError("too_large", f"{path}: {info.st_size} bytes, over {max_bytes}")
        try:
            chunks, remaining = [], max_bytes + (0 if partial else 1)
            while remaining > 0:
                chunk = os.pread(fd, min(remaining, 1 << 20), offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
                remaining -= len(chunk)
        except OSError as exc:
            raise UntrustedFileError("unreadable", f"{path}: {exc.strerror}") from None
        data = b"".join(chunks)
        if not partial and len(data) > max_bytes:  # it grew while we read
            raise UntrustedFileError("too_large", f"{path}: over {max_bytes} bytes")
        return FileData(data, info.st_ino, info.st_size, info.st_mtime_ns)


def json_depth_ok(value: object, max_depth: int) -> bool:
    """True when no list/dict nests deeper than `max_depth` (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > max_depth:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return True


def parse_json(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> object:
    """json.loads that raises UntrustedFileError('malformed') for anything it should not accept,
    including nesting deep enough to exhaust the interpreter's recursion limit."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise UntrustedFileError("malformed", "JSON nested too deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UntrustedFileError("malformed", f"not JSON: {exc}") from None
    if not json_depth_ok(value, max_depth):
        raise UntrustedFileError("malformed", f"JSON nested deeper than {max_depth}")
    return value


def parse_json_as(error: type[Exception], text: str | bytes) -> object:
    """parse_json, failing with the caller's own error type (same message): a registry entry's
    RegistryError, an engine body's ValueError."""
    try:
        return parse_json(text)
    except UntrustedFileError as exc:
        raise error(str(exc)) from None


def read_json(path: str | os.PathLike, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> object:
    return parse_json(read_untrusted(path, max_bytes).data, max_depth)


# ---------- writing ----------


def ensure_dir(path: str | os.PathLike, mode: int = DIR_MODE) -> Path:
    """Create `path` and missing parents with `mode` exactly (the umask does not narrow it).

    Directories that already exist keep their mode: an operator may have made a shared
    registry 1777 on purpose, and a directory made inside such a shared one is shared the same
    way (1777), so a framework running as another user can write there too."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        parent = os.stat(directory.parent).st_mode
        shared = parent & stat.S_ISVTX and parent & stat.S_IWOTH
        try:
            directory.mkdir(mode)
        except FileExistsError:
            continue  # another writer made it first
        os.chmod(directory, 0o1777 if shared else mode)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")
    return path


def write_atomic(path: str | os.PathLike, text: str, mode: int = FILE_MODE) -> None:
    """Temporary file, fsync, rename: readers see the old file or the new, never half of one.

    The rename replaces whatever is at `path` (a planted symlink included) without following it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def append_record(path: str | os.PathLike, line: bytes, mode: int = FILE_MODE) -> None:
    """Append one line with a single O_APPEND write and fsync: concurrent writers never interleave.

    Refuses a symlink or anything but a regular file at `path`."""
    with open_regular(path, _APPEND_FLAGS, mode) as fd:
        info = os.fstat(fd)
        if info.st_size == 0 and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != mode:
            os.fchmod(fd, mode)  # we just created it: the umask must not make it unreadable to others
        os.write(fd, line)
        os.fsync(fd)
