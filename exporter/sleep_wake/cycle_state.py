"""The cycle history's state file, beside the exit counts (exporter/exits/state.py) in --state.dir.

A restart must not cost the history: the growth per cycle needs the last N releases, and an RL run
makes one every few minutes, so an exporter that forgot them would be blind for the better part of
an hour after every restart. Like the exit state, what is written always fits MAX_STATE_BYTES: the
engines whose last release is newest first, then as many older ones as fit. A file that cannot be
read back is counted (errors_total{source="cycles_state"}) and the history starts empty; nothing
else depends on it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from exporter.errors import ErrorCounter
from gpu_residency_common.files import UntrustedFileError, ensure_dir, read_json, write_atomic

log = logging.getLogger(__name__)

STATE_FILE = "cycles.json"
MAX_STATE_BYTES = 4 * 1024 * 1024
VERSION = 1


@dataclass
class GpuResiduals:
    """One engine's post-release residuals on one GPU, oldest first: (cycle number, bytes)."""

    index: int  # the GPU's NVML index when it was last seen
    points: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class EngineCycles:
    count: int = 0  # releases that completed (cycles), over the exporter's restarts
    since: float = 0.0  # when the latest counted release began (its sleep's mark): a release is counted once
    gpus: dict[str, GpuResiduals] = field(default_factory=dict)  # uuid -> residuals


History = dict[str, EngineCycles]  # engine -> its cycles


def encode(history: History, limit: int = MAX_STATE_BYTES) -> str:
    """The history as JSON of at most `limit` bytes; the engines whose last release is oldest give way first."""
    rows: list[str] = []
    room = limit - len(_dump({"version": VERSION, "engines": []}))
    for name, cycles in sorted(history.items(), key=lambda item: -item[1].since):
        gpus = [[uuid, g.index, [list(p) for p in g.points]] for uuid, g in sorted(cycles.gpus.items())]
        row = _dump([name, cycles.count, cycles.since, gpus])
        if len(row) + 1 > room:
            continue  # this one does not fit; a smaller, older one may
        room -= len(row) + 1
        rows.append(row)
    return '{"version":%d,"engines":[%s]}' % (VERSION, ",".join(rows))  # noqa: UP031 (rows are JSON already)


def _dump(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))  # ASCII only: characters are bytes


def decode(data: object, window: int) -> History:
    """A history read back, each GPU's last `window` points; KeyError, TypeError or ValueError when
    its shape is not ours."""
    if data["version"] != VERSION:
        raise ValueError(f"version {data['version']!r}")
    history: History = {}
    for name, count, since, gpus in data["engines"]:
        if not isinstance(name, str) or not math.isfinite(float(since)):
            raise ValueError("bad engine row")
        engine = EngineCycles(int(count), float(since))
        for uuid, index, points in gpus:
            kept = [(int(cycle), int(used)) for cycle, used in points][-window:]
            engine.gpus[str(uuid)] = GpuResiduals(int(index), kept)
        history[name] = engine
    return history


def load(directory: Path | None, window: int, errors: ErrorCounter) -> History:
    """The saved history; empty when there is none, or when it was refused (counted)."""
    if directory is None:
        return {}
    try:
        return decode(read_json(directory / STATE_FILE, MAX_STATE_BYTES, max_depth=8), window)
    except UntrustedFileError as exc:
        if exc.reason == "missing":
            return {}
        reason = exc.reason
    except (KeyError, TypeError, ValueError, OverflowError):
        reason = "malformed"
    errors.inc("cycles_state", reason)
    log.warning("release cycle history in %s ignored (%s): it starts again", directory, reason)
    return {}


def save(directory: Path, history: History) -> None:
    """Write the history atomically; OSError when it cannot."""
    write_atomic(ensure_dir(directory) / STATE_FILE, encode(history))
