"""Waiting for an SGLang server to become healthy, as miles does, and saying why it died if it
dies first (framework side, standard library only)."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from exporter.exits.describe import terminated_message, with_evidence
from exporter.exits.report import exporter_evidence, report_exit

log = logging.getLogger("exporter.exits")  # the name frameworks configure, whichever module logs


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
    process_alive_fn: Callable[[], bool] | None = None,
    timeout: float | None = None,
    engine: str | None = None,
    directory: str | os.PathLike | None = None,
    poll_interval: float = 0.5,
    exporter_url: str | None = None,
) -> float:
    """Wait until the SGLang server at `base_url` answers 200 on /health_generate, then on
    /flush_cache, as miles does before using an engine; return the seconds it took.

    Takes what miles and slime pass: `process` (a multiprocessing.Process, a subprocess.Popen,
    or None for an external engine), `is_process_alive` (a callable; it wins over `process`,
    whose exit code is still reported), `api_key` (sent as a Bearer token); NeMo-RL's name for
    the callable, `process_alive_fn`, is the same argument (its method form is
    `_wait_server_healthy = staticmethod(wait_server_healthy)` in the class body). No overall
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
    if is_process_alive is not None and process_alive_fn is not None:
        raise TypeError("pass is_process_alive (miles, slime) or process_alive_fn (NeMo-RL), not both")
    if (is_process_alive or process_alive_fn) is not None:
        alive = is_process_alive or process_alive_fn
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
