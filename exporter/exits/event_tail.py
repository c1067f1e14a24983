"""Reading each line of an append-only file exactly once, across rotations and restarts.

Writers append whole lines and rotate `name` to `name.1` when it is full. A position is
kept per file identity (inode plus the file's first bytes, so a recycled inode is not
mistaken for the old file), and only complete lines are consumed: a torn last line is
read again, whole, next time. Positions are plain data, so the caller can persist them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpu_residency_common.files import UntrustedFileError, open_regular

HEAD_BYTES = 64


@dataclass(frozen=True)
class Position:
    inode: int
    offset: int
    head: bytes  # the file's first bytes when it was first read (files only grow)


class EventTail:
    def __init__(self, paths: Callable[[], list[Path]], positions: list[Position] = ()) -> None:
        """`paths`: the files to read now, each rotated file before the file it was rotated from."""
        self._paths = paths
        self._positions = {p.inode: p for p in positions}

    @property
    def positions(self) -> list[Position]:
        return list(self._positions.values())

    def read_new(self, max_bytes: int) -> tuple[list[bytes], list[str]]:
        """(new complete lines, reasons of files that could not be read); at most `max_bytes` a call."""
        lines: list[bytes] = []
        problems: list[str] = []
        seen: set[int] = set()
        budget = max_bytes
        for path in self._paths():
            try:
                with open_regular(path) as fd:
                    inode = os.fstat(fd).st_ino
                    seen.add(inode)
                    if budget > 0:
                        got = self._read_file(fd, inode, budget)
                        budget -= sum(len(line) + 1 for line in got)
                        lines += got
            except UntrustedFileError as exc:
                if exc.reason != "missing":
                    problems.append(exc.reason)
                    seen.update(self._positions)  # unreadable now is not gone: keep where we were
            except OSError:
                problems.append("unreadable")
                seen.update(self._positions)
        self._positions = {inode: p for inode, p in self._positions.items() if inode in seen}
        return lines, problems

    def _read_file(self, fd: int, inode: int, budget: int) -> list[bytes]:
        size = os.fstat(fd).st_size
        head = os.pread(fd, HEAD_BYTES, 0)
        known = self._positions.get(inode)
        if known is None or head[: len(known.head)] != known.head or size < known.offset:
            known = Position(inode, 0, head)  # a new file (or one truncated or replaced in place)
        if size == known.offset:
            self._positions[inode] = known
            return []
        data = os.pread(fd, min(budget, size - known.offset), known.offset)
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) < budget:
                self._positions[inode] = known
                return []  # a torn last line: read it whole next time
            end = len(data) - 1  # a line longer than the whole budget: skip it, the caller counts it
        consumed = data[: end + 1]
        head = known.head if len(known.head) >= HEAD_BYTES else os.pread(fd, HEAD_BYTES, 0)
        self._positions[inode] = Position(inode, known.offset + len(consumed), head)
        return consumed.split(b"\n")[:-1]
