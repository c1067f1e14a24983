"""Why an engine died, said clearly, and recorded durably (framework side, standard library only).

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
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

from exporter.exit_event import EVENTS_FILE, MAX_EVENT_BYTES, MAX_TEXT_FIELD, ROTATED_SUFFIX, EventTooLarge, ExitEvent
from exporter.registry import ENTRY_SUFFIX, RegistryError, read_entry, registry_dir
from gpu_residency_common.exporter_client import URL_ENV, ExporterClient, ExporterError
from gpu_residency_common.files import UntrustedFileError, append_record, ensure_dir, open_regular

LOCK_FILE = ".events.lock"
ROTATE_BYTES = 1024 * 1024
EXITS_PATH = "/api/v1/exits"
EVIDENCE_WAIT_S = 5.0  # how long a dying engine's message waits for the exporter's evidence, all told

log = logging.getLogger(__name__)

_HINTS = {
    # Not "an OOM kill": SGLang's launcher SIGKILLs its own tree when a scheduler child fails.
    signal.SIGKILL: "killed by SIGKILL: the kernel OOM killer (host or cgroup memory), SGLang's launcher killing "
    "its tree after a scheduler failed, or an outside kill (operator, Ray); when the exporter runs, its crash "
    "forensics (`gpu-residency-exporter exits`, /api/v1/exits) can tell which",
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
    exitcode: int | None,
    elapsed: float | None = None,
    url: str | None = None,
    phase: str = "during start-up",
    evidence: dict | None = None,
) -> str:
    """One line for a human: how the engine ended, when, where, and what it can mean, or, with the
    exporter's record of the exit (`evidence`, see exporter_evidence), what it found.

    Negative codes are signals (multiprocessing / subprocess convention); 128+N is a
    signal as a shell reports it.
    """
    detail, hint = _explain(exitcode)
    detail = detail or "no exit status: still running, or not its parent"
    parts = [f"terminated {phase}: exitcode={exitcode} ({detail})"]
    if elapsed is not None:
        parts.append(f"elapsed={elapsed:.1f}s")
    if url:
        parts.append(f"url={url}")
    text = ", ".join(parts)
    if evidence and evidence.get("cause") not in (None, "unknown"):
        return with_evidence(text, evidence)
    return f"{text}; {hint}" if hint else text


def _explain(exitcode: int | None) -> tuple[str, str]:
    """(what the code means, the likely cause): ("killed by SIGKILL", "killed by SIGKILL: the kernel ...")."""
    if exitcode is None:
        return "", ""
    if exitcode < 0:
        return f"killed by {signal_name(-exitcode)}", _HINTS.get(-exitcode, "")
    if 128 < exitcode < 128 + 65:
        signum = exitcode - 128
        return f"128+{signum}: killed by {signal_name(signum)}, as a shell reports it", _HINTS.get(signum, "")
    if exitcode == 0:
        return "exited normally", "it stopped on its own before it was expected to"
    return f"exited with status {exitcode}", "see the engine's own log for the error"


def terminated_message(phase: str, exitcode: int | None, elapsed: float, url: str) -> str:
    """miles' wording (its PR #572), so searches of existing logs keep matching, with our cause:
    "Server process terminated unexpectedly during flush_cache. exitcode=-9, elapsed=3.2s,
    url=http://h:30000 (killed by SIGKILL); killed by SIGKILL: the kernel OOM killer ..."."""
    detail, hint = _explain(exitcode)
    text = f"Server process terminated unexpectedly during {phase}. "
    text += f"exitcode={exitcode}, elapsed={elapsed:.1f}s, url={url}"
    if detail:
        text += f" ({detail})"
    return f"{text}; {hint}" if hint else text


def exit_labels(exitcode: int | None) -> tuple[str, str]:
    """(exit_code, signal) label values: ('-9', 'SIGKILL'), ('3', ''), ('unknown', '')."""
    if exitcode is None:
        return "unknown", ""
    if exitcode < 0:
        return str(exitcode), signal_name(-exitcode)
    return str(exitcode), ""


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


def with_evidence(message: str, record: dict | None) -> str:
    """The message, and what the exporter found, when it found something."""
    if not record or record.get("cause") in (None, "unknown"):
        return message
    return f"{message}. The exporter found: {record['cause']}: {record.get('detail', '')}"


class EngineExitedError(RuntimeError):
    """The engine died before it became healthy; str() is terminated_message's text."""

    def __init__(self, message: str, exitcode: int | None) -> None:
        super().__init__(message)
        self.exitcode = exitcode


# miles' two waits, in its order and with its phase names: the model answers a generation,
# then the queue is empty (so an offload right after is safe).
HEALTH_PHASES = (("health_generate check", "/health_generate"), ("flush_cache", "/flush_cache"))
REQUEST_TIMEOUT_S = 30.0  # one request; a liveness check runs every poll while it is out


def _exitcode(process) -> int | None:
    """Exit status of a subprocess.Popen or a multiprocessing.Process, None while it runs."""
    if hasattr(process, "poll"):
        return process.poll()
    return None if process.is_alive() else process.exitcode


def _status(url: str, headers: dict[str, str]) -> int | None:
    """The HTTP status of GET `url`, or None when there is no answer (refused, reset, garbage, too slow)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=REQUEST_TIMEOUT_S) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except Exception:  # URLError, OSError, http.client.HTTPException, ValueError: not healthy (yet)
        return None


def _ask(url: str, headers: dict[str, str], alive: Callable[[], bool], deadline: float | None, poll: float):
    """_status on a daemon thread, checking `alive` every `poll` seconds meanwhile: an engine that
    dies while its server holds the request is noticed at once. None when it died or time ran out."""
    answers: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=lambda: answers.put(_status(url, headers)), name="wait-server-healthy", daemon=True).start()
    while True:
        wait = poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic()))
        try:
            return answers.get(timeout=wait)
        except queue.Empty:
            if not alive() or (deadline is not None and time.monotonic() >= deadline):
                return None


def wait_server_healthy(
    base_url: str,
    process=None,
    *,
    api_key: str | None = None,
    is_process_alive: Callable[[], bool] | None = None,
    timeout: float | None = None,
    engine: str | None = None,
    directory: str | os.PathLike | None = None,
    poll_interval: float = 0.5,
    exporter_url: str | None = None,
) -> float:
    """Wait until the SGLang server at `base_url` answers 200 on /health_generate, then on
    /flush_cache, as miles does before using an engine; return the seconds it took.

    Takes what miles passes: `process` (a multiprocessing.Process, a subprocess.Popen, or
    None for an external engine), `is_process_alive` (a callable; it wins over `process`,
    whose exit code is still reported), `api_key` (sent as a Bearer token). No overall
    timeout unless `timeout` is given (model loads are slow); then TimeoutError.

    If the process dies first, raise EngineExitedError (a RuntimeError) at once: "Server
    process terminated unexpectedly during <phase>. exitcode=..., elapsed=..., url=..." with
    the likely cause. With `engine`, the exit is also recorded for the exporter; a failure to
    record is logged and never replaces that error; and where an exporter is known
    (`exporter_url` or $GPU_RESIDENCY_EXPORTER_URL) the message ends with the cause its crash
    forensics found ("The exporter found: oom_kill: ..."), waiting at most EVIDENCE_WAIT_S for it.
    """
    if isinstance(process, str):
        raise TypeError("process must be a multiprocessing.Process, a subprocess.Popen or None; pass api_key= by name")
    if is_process_alive is not None:
        alive = is_process_alive
    elif process is not None:

        def alive() -> bool:
            return _exitcode(process) is None

    else:

        def alive() -> bool:
            return True  # an external engine: nothing to watch

    headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    for phase, path in HEALTH_PHASES:
        url = base_url.rstrip("/") + path
        while _ask(url, headers, alive, deadline, poll_interval) != 200:
            if not alive():
                _engine_died(phase, process, time.monotonic() - started, base_url, engine, directory, exporter_url)
            if deadline is not None and time.monotonic() >= deadline:
                message = f"{url} not healthy after {timeout:g}s, during {phase} (process still running)"
                log.warning("%s", message)
                raise TimeoutError(message)
            time.sleep(poll_interval if deadline is None else max(0.0, min(poll_interval, deadline - time.monotonic())))
    took = time.monotonic() - started
    log.info("%s healthy (health_generate, flush_cache) after %.1fs", base_url, took)
    return took


def _engine_died(
    phase: str, process, elapsed: float, url: str, engine: str | None, directory, exporter_url: str | None
) -> None:
    code = _exitcode(process) if process is not None else None
    message = terminated_message(phase, code, elapsed, url)
    if engine:
        since = time.time() - elapsed
        try:
            report_exit(engine, code, elapsed=elapsed, url=url, directory=directory)
        except (OSError, ValueError) as exc:  # an unwritable registry: the engine's death is the error
            log.warning("could not record the exit of engine %s: %s", engine, exc)
        message = with_evidence(message, exporter_evidence(engine, since, exporter_url))
    log.error("%s", message)
    raise EngineExitedError(message, code)
