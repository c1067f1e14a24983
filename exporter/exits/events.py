"""The registry's events files, and one exit event as a line of them: what the writer may write,
and all the reader accepts. Events files are written by frameworks, any user of a shared registry among
them, so each line is checked field by field and against the writer's own size limit before it
becomes a count, a label or a record kept in the exporter's state.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from exporter.engines.registry import NAME_PATTERN
from gpu_residency_common.files import parse_json

EVENTS_FILE = "events.jsonl"
ROTATED_SUFFIX = ".1"
MAX_EVENT_BYTES = 4096  # one write of at most PIPE_BUF-ish size stays whole under O_APPEND
MAX_TEXT_FIELD = 1024  # an event keeps at most this much of a URL: it is for a human to read


def event_files(directory: Path) -> list[Path]:
    """events.jsonl and any per-user events.<uid>.jsonl, each after its rotated .1."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    bases = sorted(n for n in names if n.startswith("events") and n.endswith(".jsonl"))
    if EVENTS_FILE not in bases:
        bases.insert(0, EVENTS_FILE)  # a rotated .1 alone is still read
    return [directory / name for base in bases for name in (base + ROTATED_SUFFIX, base)]


class EventTooLarge(ValueError):
    """An event that would not fit one atomic append."""


@dataclass(frozen=True)
class ExitEvent:
    id: str
    engine: str
    exitcode: int | None  # None: the exporter saw the root vanish with no report
    time: float
    elapsed: float | None = None
    url: str | None = None
    root_pid: int | None = None
    start_ticks: int | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str | bytes) -> ExitEvent:
        """One line of an events file, checked as the writer would have written it: at most
        MAX_EVENT_BYTES, every field of its type (EventTooLarge, else ValueError, for the counter)."""
        if len(line) >= MAX_EVENT_BYTES:  # the writer's limit counts the newline the reader strips
            raise EventTooLarge(f"event line of {len(line)} bytes")
        return cls.from_dict(parse_json(line))

    @classmethod
    def from_dict(cls, data: object) -> ExitEvent:
        if not isinstance(data, dict):
            raise ValueError("an event is a JSON object")
        for key, check in _FIELD_CHECKS.items():
            if not check(data.get(key)):
                raise ValueError(f"event field {key} is missing or invalid")
        return cls(**{key: data.get(key) for key in cls.__dataclass_fields__})


def _number(value: object) -> bool:
    """A JSON number a float can hold, not negative (times and durations)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value) and value >= 0
    except OverflowError:  # an integer beyond any float
        return False


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_FIELD_CHECKS: dict[str, Callable[[object], bool]] = {
    "id": lambda v: isinstance(v, str) and 0 < len(v) <= 128,
    "engine": lambda v: isinstance(v, str) and NAME_PATTERN.match(v) is not None,
    "exitcode": lambda v: v is None or (_integer(v) and -128 <= v <= 255),  # a status, or -N for signal N
    "time": _number,
    "elapsed": lambda v: v is None or _number(v),
    "url": lambda v: v is None or (isinstance(v, str) and len(v) <= MAX_TEXT_FIELD),
    "root_pid": lambda v: v is None or (_integer(v) and v > 0),
    "start_ticks": lambda v: v is None or (_integer(v) and v >= 0),
}
