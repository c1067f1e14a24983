"""What the kernel tells without being asked: a process's exit (a pidfd) and a directory's changes
(inotify). Both are file descriptors that poll readable, so one thread blocked in `select` hears
about every death and every registry write at once and costs nothing in between.

pidfd: `os.pidfd_open` (Linux >= 5.3) works for any process this one may see, child or not; it
polls readable once the process has exited (a zombie included, so its exit status can still be
read from /proc until its parent reaps it). inotify: through libc with ctypes (no dependency).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# inotify(7): what changes a registry: an entry written (renamed into place) or removed, an
# events file appended to. IN_NONBLOCK | IN_CLOEXEC for inotify_init1.
_IN_MODIFY, _IN_CLOSE_WRITE, _IN_MOVED_FROM, _IN_MOVED_TO = 0x2, 0x8, 0x40, 0x80
_IN_CREATE, _IN_DELETE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
_MASK = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
_MASK |= _IN_DELETE_SELF | _IN_MOVE_SELF
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC


def open_pidfd(pid: int) -> int | None:
    """A descriptor that polls readable when `pid` exits; None when the process is already gone or
    the kernel has no pidfd (then the caller falls back to looking)."""
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6", use_errno=True)
        return libc if hasattr(libc, "inotify_init1") else None
    except OSError:
        return None


class DirectoryWatch:
    """inotify on one directory. `fileno()` polls readable after a change; `changed()` drains the
    queue and says whether anything happened (or that the watch could not be set, so the caller
    must look itself: the directory did not exist yet, or inotify is unavailable)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None
        self._armed = False
        libc = _libc()
        if libc is None:
            return
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            log.info("inotify unavailable (errno %d): the registry is looked at instead", ctypes.get_errno())
            return
        self._libc, self._fd = libc, fd
        self.arm()

    @property
    def armed(self) -> bool:
        """Whether changes are being heard; when not, `arm()` again later (the directory may appear)."""
        return self._armed

    def arm(self) -> bool:
        if self._fd is None or self._armed:
            return self._armed
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(self._path), _MASK)
        self._armed = wd >= 0
        return self._armed

    def fileno(self) -> int | None:
        return self._fd

    def changed(self) -> bool:
        """Drain what arrived: True when the directory changed (or went away: re-arm then)."""
        if self._fd is None:
            return False
        got = b""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while chunk := os.read(self._fd, 65536):
                got += chunk
        if not got:
            return False
        offset = 0
        while offset + 16 <= len(got):  # struct inotify_event: wd, mask, cookie, len, name[len]
            mask = int.from_bytes(got[offset + 4 : offset + 8], "little")
            if mask & (_IN_DELETE_SELF | _IN_MOVE_SELF | 0x8000):  # IN_IGNORED: the watch is gone
                self._armed = False
            offset += 16 + int.from_bytes(got[offset + 12 : offset + 16], "little")
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
