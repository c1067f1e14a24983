"""The exit log's state file: counts and read positions that survive a restart, never over its limit.

A state file the exporter cannot read back is worse than none: every count starts again from the
events files, and those rotated away are lost. So what is written always fits MAX_STATE_BYTES: the
counts, the read positions and the exits still waiting for their evidence (what a restart needs to
count every exit once) always, then as many of the newest remembered event ids and recent exit
records (/api/v1/exits) as fit. Where even that much would not fit, the previous file is kept:
its counts match its positions, so a restart from it still counts every exit once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from exporter.errors import ErrorCounter
from exporter.exits.event_tail import Position
from exporter.exits.events import ExitEvent
from gpu_residency_common.files import UntrustedFileError, ensure_dir, read_json, write_atomic

log = logging.getLogger(__name__)

STATE_FILE = "exits.json"
MAX_STATE_BYTES = 16 * 1024 * 1024
VERSION = 2

CountKey = tuple[str, str, str, str]  # engine, exit_code, signal, cause


class StateTooLarge(ValueError):
    """The counts, positions and pending exits alone would not fit the state file's limit."""


@dataclass
class SavedState:
    counts: dict[CountKey, tuple[int, float]]  # key -> (value, wall-clock time of the latest event)
    positions: list[Position]
    pending: list[ExitEvent]
    ids: list[str]  # oldest first
    recent: list[dict]  # oldest first


def encode_state(state: SavedState, limit: int = MAX_STATE_BYTES) -> str:
    """The state as JSON of at most `limit` bytes; the oldest ids and recent records give way first."""
    body: dict = {
        "version": VERSION,
        "counts": [[*key, value, last] for key, (value, last) in sorted(state.counts.items())],
        "positions": [[p.inode, p.offset, p.head.hex()] for p in state.positions],
        "pending": [asdict(event) for event in state.pending],
        "ids": [],
        "recent": [],
    }
    room = limit - len(_dump(body))
    if room < 0:
        raise StateTooLarge(f"counts, positions and pending exits need {limit - room} bytes, over {limit}")
    for key in ("ids", "recent"):
        items = getattr(state, key)
        kept = 0
        for item in reversed(items):
            size = len(_dump(item)) + 1  # and its comma
            if size > room:
                break
            room -= size
            kept += 1
        body[key] = items[len(items) - kept :]
    return _dump(body)


def _dump(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))  # ASCII only: characters are bytes


def decode_state(data: object) -> SavedState:
    """A state read back; KeyError, TypeError or ValueError when its counts or positions are not
    usable. A pending exit or record that does not check out is dropped alone."""
    counts = {}
    for row in data["counts"]:
        engine, code, signal_label, *cause, value, last = row  # version 1 had no cause
        counts[(str(engine), str(code), str(signal_label), str(cause[0]) if cause else "unknown")] = (
            int(value),
            float(last),
        )
    pending = []
    for event in data.get("pending", []):
        try:
            pending.append(ExitEvent.from_dict(event))
        except ValueError:
            continue
    return SavedState(
        counts=counts,
        positions=[Position(int(i), int(o), bytes.fromhex(h)) for i, o, h in data["positions"]],
        pending=pending,
        ids=[str(event_id) for event_id in data.get("ids", [])],
        recent=[record for record in data.get("recent", []) if isinstance(record, dict)],
    )


def load_state(directory: Path, errors: ErrorCounter) -> SavedState | None:
    """The saved state, or None: missing, or refused and counted (counting starts again from the files)."""
    try:
        return decode_state(read_json(directory / STATE_FILE, MAX_STATE_BYTES, max_depth=8))
    except UntrustedFileError as exc:
        if exc.reason == "missing":
            return None
        reason = exc.reason
    except (KeyError, TypeError, ValueError):
        reason = "malformed"
    errors.inc("exits_state", reason)
    log.warning("exit state in %s ignored (%s): counting again from the events files", directory, reason)
    return None


def save_state(directory: Path, state: SavedState) -> None:
    """Write the state atomically; StateTooLarge (the previous file stands) or OSError."""
    write_atomic(ensure_dir(directory) / STATE_FILE, encode_state(state))
