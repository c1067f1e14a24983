"""Why an engine died, said clearly, and recorded durably (framework side, standard library only).

Only the parent of a process learns its exit status, so the framework that launched the
engine reports it::

    from exporter.exits import describe_exit, report_exit, wait_server_healthy

    try:
        wait_server_healthy(url, proc, timeout=600, engine="rollout-0")
    except EngineExitedError as exc:
        raise RuntimeError(str(exc))   # "... exitcode=-9 (killed by SIGKILL) ...; likely an OOM kill"

`report_exit` appends one JSON line to the registry's events file with a single
O_APPEND write, so concurrent reporters never interleave and the exporter, even after a
restart, counts each exit exactly once. The file is bounded: the writer that finds it over
ROTATE_BYTES renames it to `events.jsonl.1` (under a lock, replacing the previous one)
before appending; the exporter reads both and keeps its counts in its own state, so a
rotation loses no count.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from exporter.registry import ENTRY_SUFFIX, RegistryError, read_entry, registry_dir
from gpu_residency_common.files import append_record, ensure_dir, open_regular, parse_json

EVENTS_FILE = "events.jsonl"
ROTATED_SUFFIX = ".1"
LOCK_FILE = ".events.lock"
ROTATE_BYTES = 1024 * 1024
MAX_EVENT_BYTES = 4096  # one write of at most PIPE_BUF-ish size stays whole under O_APPEND
MAX_TEXT_FIELD = 1024  # an event keeps at most this much of a URL: it is for a human to read

_HINTS = {
    signal.SIGKILL: "likely an OOM kill (host OOM killer or a cgroup memory limit); check dmesg and the pod's events",
    signal.SIGSEGV: "a crash in native code (CUDA, NCCL or a kernel extension)",
    signal.SIGABRT: "an abort, often a failed CUDA/NCCL assertion",
    signal.SIGBUS: "a bus error, often exhausted shared memory (/dev/shm)",
    signal.SIGTERM: "asked to stop (SIGTERM), by the framework, Kubernetes or a user",
    signal.SIGINT: "interrupted (SIGINT)",
}


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_exit(
    exitcode: int | None, elapsed: float | None = None, url: str | None = None, phase: str = "during start-up"
) -> str:
    """One line for a human: how the engine ended, when, where, and the likely cause.

    Negative codes are signals (multiprocessing / subprocess convention); 128+N is a
    signal as a shell reports it.
    """
    hint = ""
    if exitcode is None:
        status = "exitcode=None (no exit status: still running, or not its parent)"
    elif exitcode < 0:
        status, hint = f"exitcode={exitcode} (killed by {signal_name(-exitcode)})", _HINTS.get(-exitcode, "")
    elif 128 < exitcode < 128 + 65:
        signum = exitcode - 128
        status = f"exitcode={exitcode} (128+{signum}: killed by {signal_name(signum)}, as a shell reports it)"
        hint = _HINTS.get(signum, "")
    elif exitcode == 0:
        status, hint = "exitcode=0 (exited normally)", "it stopped on its own before it was expected to"
    else:
        status, hint = f"exitcode={exitcode} (exited with status {exitcode})", "see the engine's own log for the error"
    parts = [f"terminated {phase}: {status}"]
    if elapsed is not None:
        parts.append(f"elapsed={elapsed:.1f}s")
    if url:
        parts.append(f"url={url}")
    text = ", ".join(parts)
    return f"{text}; {hint}" if hint else text


def exit_labels(exitcode: int | None) -> tuple[str, str]:
    """(exit_code, signal) label values: ('-9', 'SIGKILL'), ('3', ''), ('unknown', '')."""
    if exitcode is None:
        return "unknown", ""
    if exitcode < 0:
        return str(exitcode), signal_name(-exitcode)
    return str(exitcode), ""


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
        data = parse_json(line)
        if not isinstance(data, dict) or not isinstance(data.get("id"), str) or not isinstance(data.get("engine"), str):
            raise ValueError("an event needs string id and engine")
        code = data.get("exitcode")
        if code is not None and (isinstance(code, bool) or not isinstance(code, int)):
            raise ValueError("exitcode must be an integer or null")
        when = data.get("time")
        if isinstance(when, bool) or not isinstance(when, int | float):
            raise ValueError("time must be a number")
        known = {key: data.get(key) for key in cls.__dataclass_fields__}
        return cls(**known)


class EventTooLarge(ValueError):
    """An event that would not fit one atomic append."""


def append_event(event: ExitEvent, directory: str | os.PathLike | None = None) -> Path:
    """Append one event with a single O_APPEND write and fsync: whole or not at all."""
    folder = ensure_dir(registry_dir(directory))
    path = folder / EVENTS_FILE
    line = (event.to_json() + "\n").encode()
    if len(line) > MAX_EVENT_BYTES:
        raise EventTooLarge(f"event too large ({len(line)} bytes)")
    _rotate_if_full(path)
    append_record(path, line)
    return path


def _rotate_if_full(path: Path) -> None:
    """events.jsonl -> events.jsonl.1 once it is over ROTATE_BYTES; one writer at a time decides."""
    try:
        if path.lstat().st_size < ROTATE_BYTES:
            return
    except OSError:
        return
    try:
        with open_regular(path.with_name(LOCK_FILE), os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC) as fd:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if path.lstat().st_size >= ROTATE_BYTES:  # not already rotated by a writer we waited for
                os.replace(path, path.with_name(EVENTS_FILE + ROTATED_SUFFIX))
    except (OSError, ValueError):
        pass  # not ours to rotate (another user's file in a sticky directory): keep appending


def _clip(text: str | None) -> str | None:
    return text if text is None or len(text) <= MAX_TEXT_FIELD else text[: MAX_TEXT_FIELD - 1] + "…"


def _registered(engine: str, directory: str | os.PathLike | None):
    try:
        return read_entry(registry_dir(directory) / f"{engine}{ENTRY_SUFFIX}")
    except (OSError, RegistryError):
        return None


def report_exit(
    engine: str,
    exitcode: int | None,
    elapsed: float | None = None,
    url: str | None = None,
    directory: str | os.PathLike | None = None,
) -> ExitEvent:
    """Record an engine's exit (call it from the engine's parent, which knows the code)."""
    entry = _registered(engine, directory)
    event = ExitEvent(
        id=uuid.uuid4().hex,
        engine=engine,
        exitcode=exitcode,
        time=time.time(),
        elapsed=None if elapsed is None else round(float(elapsed), 3),
        url=_clip(url or (entry.url if entry else None)),
        root_pid=entry.root_pid if entry else None,
        start_ticks=entry.start_ticks if entry else None,
    )
    append_event(event, directory)
    return event


class EngineExitedError(RuntimeError):
    """The engine died before it became healthy; str() is describe_exit's message."""

    def __init__(self, message: str, exitcode: int | None) -> None:
        super().__init__(message)
        self.exitcode = exitcode


def _exitcode(process) -> int | None:
    """Exit status of a subprocess.Popen or a multiprocessing.Process, None while it runs."""
    if hasattr(process, "poll"):
        return process.poll()
    return None if process.is_alive() else process.exitcode


def wait_server_healthy(
    url: str,
    process,
    timeout: float,
    engine: str | None = None,
    directory: str | os.PathLike | None = None,
    poll_interval: float = 0.5,
) -> float:
    """Poll `url`/health until 200; return the seconds it took.

    If `process` dies first, record the exit (when `engine` is given) and raise
    EngineExitedError with describe_exit's message at once instead of waiting out the
    timeout. Raises TimeoutError when the server is not healthy in time.
    """
    started = time.monotonic()
    health = url.rstrip("/") + "/health"
    while True:
        elapsed = time.monotonic() - started
        code = _exitcode(process)
        if code is not None:
            if engine:
                report_exit(engine, code, elapsed=elapsed, url=url, directory=directory)
            raise EngineExitedError(describe_exit(code, elapsed, url), code)
        try:
            with urllib.request.urlopen(health, timeout=min(5.0, max(0.1, timeout - elapsed))) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() - started >= timeout:
            raise TimeoutError(f"{health} not healthy after {timeout:.0f}s (process still running)")
        time.sleep(poll_interval)
