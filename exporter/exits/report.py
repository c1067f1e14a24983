"""Why an engine died, recorded durably (framework side, standard library only).

Only the parent of a process learns its exit status, so the framework that launched the
engine reports it::

    from exporter.exits import describe_exit, report_exit, wait_server_healthy

    wait_server_healthy(url, process=proc, api_key=key, engine="rollout-0")
    # an engine that dies first raises EngineExitedError (a RuntimeError):
    # "Server process terminated unexpectedly during flush_cache. exitcode=-9, elapsed=41.2s,
    #  url=http://127.0.0.1:30000 (killed by SIGKILL); killed by SIGKILL: the kernel OOM killer ..."

`report_exit` appends one JSON line to the registry's events file with a single
O_APPEND write, so concurrent reporters never interleave and the exporter, even after a
restart, counts each exit exactly once. The file is bounded: the writer that finds it over
ROTATE_BYTES renames it to `events.jsonl.1` (under a lock, replacing the previous one)
before appending; the exporter reads both and keeps its counts in its own state, so a
rotation loses no count.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import threading
import time
import uuid
from pathlib import Path

from exporter.engines.registry import ENTRY_SUFFIX, RegistryError, read_entry, registry_dir
from exporter.exits.events import EVENTS_FILE, MAX_EVENT_BYTES, MAX_TEXT_FIELD, ROTATED_SUFFIX, EventTooLarge, ExitEvent
from gpu_residency_common.exporter_client import URL_ENV, ExporterClient, ExporterError
from gpu_residency_common.files import UntrustedFileError, append_record, ensure_dir, open_regular

LOCK_FILE = ".events.lock"
ROTATE_BYTES = 1024 * 1024
EXITS_PATH = "/api/v1/exits"
EVIDENCE_WAIT_S = 5.0  # how long a dying engine's message waits for the exporter's evidence, all told

log = logging.getLogger("exporter.exits")  # the name frameworks configure, whichever module logs


def append_event(event: ExitEvent, directory: str | os.PathLike | None = None) -> Path:
    """Append one event with a single O_APPEND write and fsync: whole or not at all."""
    folder = ensure_dir(registry_dir(directory))
    line = (event.to_json() + "\n").encode()
    if len(line) > MAX_EVENT_BYTES:
        raise EventTooLarge(f"event too large ({len(line)} bytes)")
    path = folder / EVENTS_FILE
    try:
        _rotate_if_full(path)
        append_record(path, line)
    except UntrustedFileError as exc:
        if exc.reason != "unreadable":
            raise
        # Another user's file in a shared (1777) registry: this user appends to its own, which
        # the exporter reads too.
        path = folder / own_events_file()
        _rotate_if_full(path)
        append_record(path, line)
    return path


def own_events_file() -> str:
    """events.<uid>.jsonl: where a writer goes when events.jsonl belongs to another user."""
    return f"events.{os.geteuid()}.jsonl"


def _rotate_if_full(path: Path) -> None:
    """events*.jsonl -> events*.jsonl.1 once it is over ROTATE_BYTES; one writer at a time decides."""
    try:
        if path.lstat().st_size < ROTATE_BYTES:
            return
    except OSError:
        return
    try:
        with open_regular(path.with_name(LOCK_FILE), os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC) as fd:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if path.lstat().st_size >= ROTATE_BYTES:  # not already rotated by a writer we waited for
                os.replace(path, path.with_name(path.name + ROTATED_SUFFIX))
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


def fetch_exits(
    client: ExporterClient, engine: str | None = None, since: float = 0.0, wait: float = 0.0, limit: int = 50
) -> list[dict]:
    """The exporter's recent exits with their cause and evidence (newest first; `wait` seconds for one
    newer than `since`); ExporterError when it cannot be asked."""
    query = {k: str(v) for k, v in {"engine": engine, "since": since, "wait": wait, "limit": limit}.items() if v}
    body = client.get_json(EXITS_PATH, query, client.timeout + wait)
    if not isinstance(body, dict) or not isinstance(body.get("exits"), list):
        raise ExporterError(f"{client.url}{EXITS_PATH}: not an exits answer")
    return [record for record in body["exits"] if isinstance(record, dict)]


def exporter_evidence(engine: str, since: float, exporter_url: str | None = None) -> dict | None:
    """The exporter's record of this engine's exit since `since`, if an exporter is known
    (`exporter_url` or $GPU_RESIDENCY_EXPORTER_URL, with its CA and credentials from the
    environment) and has it within EVIDENCE_WAIT_S, all told; never raises."""
    if not (exporter_url or os.environ.get(URL_ENV)):
        return None
    answers: queue.SimpleQueue = queue.SimpleQueue()

    def ask() -> None:
        try:
            client = ExporterClient(exporter_url, timeout=EVIDENCE_WAIT_S)
            # The exporter holds the answer until the exit is in, leaving a second to connect and read.
            answers.put(fetch_exits(client, engine, since=since, wait=EVIDENCE_WAIT_S - 1.0, limit=1))
        except ExporterError as exc:
            answers.put(exc)

    # A thread with a deadline: socket timeouts bound each read, not the whole call.
    threading.Thread(target=ask, name="exporter-evidence", daemon=True).start()
    try:
        answer = answers.get(timeout=EVIDENCE_WAIT_S)
    except queue.Empty:
        answer = ExporterError(f"no answer in {EVIDENCE_WAIT_S:g}s")
    if isinstance(answer, Exception):
        log.info("no evidence from the exporter: %s", answer)
        return None
    return answer[0] if answer else None
