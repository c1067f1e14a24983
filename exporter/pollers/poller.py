"""Background polling of engines' HTTP endpoints; a scrape only reads the latest results.

One poller per kind of client (SGLang accounting, vLLM sleep state): it polls each live
engine whose URL the policy allows, every `interval`, backing off on failure, each poll a
daemon thread bounded by the fetch deadline (one slow engine delays nobody else): a poll
that needs several requests shares one deadline among them. Results are keyed by the
engine's identity (name, URL, root process): a re-registered engine starts with no inherited
results, backoff or history, and an engine that leaves takes its state with it. A client
that needs the history of its polls (when did a value change) gets it through `fold`, per
identity. If the loop itself stops ticking, results are withdrawn: stale is not data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from exporter.engines.catalog import Engine
from exporter.errors import ErrorCounter
from exporter.pollers.http_fetch import FetchError, Response, fetch
from exporter.pollers.url_policy import UrlPolicy
from exporter.supervisor import run_supervised

log = logging.getLogger(__name__)

T = TypeVar("T")
MIN_WAIT_SECONDS = 0.05  # the shortest sleep between looks (a poll just came due)
Get = Callable[[str], Response]
# (the last successful value of this engine or None, the new one, wall-clock time of the poll) -> value kept
Fold = Callable[[T | None, T, float], T]


class PollError(Exception):
    """A poll that failed for a known reason (the error counter's label)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Client(Protocol[T]):
    def poll(self, base_url: str, get: Get) -> T:
        """One poll of the engine at `base_url`; raises PollError or FetchError."""

    def forget(self, base_url: str) -> None:
        """Drop whatever was learnt about `base_url` (an engine that left or changed)."""


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    identity: tuple  # root PID, start time, registration time: a new engine under an old name differs


@dataclass(frozen=True)
class PollResult(Generic[T]):
    ok: bool
    value: T | None
    at: float  # monotonic time of the poll


class EnginePoller(Generic[T]):
    def __init__(
        self,
        source: str,
        kinds: tuple[str, ...],
        client: Client[T],
        errors: ErrorCounter,
        policy: UrlPolicy,
        interval: float = 15.0,
        connect_timeout: float = 1.0,
        read_timeout: float = 3.0,
        max_bytes: int = 1024 * 1024,
        max_backoff: float = 300.0,
        workers: int = 4,
        fold: Fold[T] | None = None,
    ) -> None:
        """`source`: the error counter's label; `fold`: combines each successful value with the engine's
        previous one (its history). The engines come to `track` (every resolution of the catalog)."""
        self.source = source
        self._kinds = kinds
        self._client = client
        self._errors = errors
        self._policy = policy
        self._interval = interval
        self._connect_timeout = connect_timeout
        self._deadline = connect_timeout + read_timeout
        self._max_bytes = max_bytes
        self._max_backoff = max_backoff
        self._fold = fold
        self._last_value: dict[Target, T] = {}  # the last successful value, for `fold`
        self._slots = threading.BoundedSemaphore(workers)
        self._tick = min(1.0, interval)
        self._lock = threading.Lock()
        self._targets: dict[str, Target] = {}
        self._results: dict[Target, PollResult[T]] = {}
        self._failures: dict[Target, int] = {}
        self._next_poll: dict[Target, float] = {}
        self._in_flight: set[Target] = set()
        self._refused: set[tuple[str, str]] = set()
        self._due_at: float | None = None  # when the loop should look next (None: when woken)
        self._wake = threading.Event()
        self._stopping = False

    # --- lifecycle ---

    def start(self) -> None:
        self._due_at = time.monotonic()
        threading.Thread(target=self._loop, name=f"{self.source}-poller", daemon=True).start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            run_supervised(f"{self.source}-poller", self._start_due, self._errors)
            wait = self._until_due()
            self._due_at = None if wait is None else time.monotonic() + wait
            self._wake.wait(wait)

    def _until_due(self) -> float | None:
        """Asleep until the next poll is due, or until `track` brings new targets (None: no engine to
        poll, no wake-up at all). A poll in flight is looked after at the tick (its next one is set
        when it ends)."""
        with self._lock:
            if not self._targets:
                return None
            now = time.monotonic()
            wake = min(
                now + self._tick if target in self._in_flight else self._next_poll.get(target, 0.0)
                for target in self._targets.values()
            )
        return max(MIN_WAIT_SECONDS, wake - now)

    # --- which engines ---

    def track(self, engines: Iterable[Engine]) -> None:
        """The engines to poll: live engines of our kinds with a URL the policy allows."""
        engines = list(engines)
        wanted: dict[str, Target] = {}
        for engine in engines:
            if engine.kind not in self._kinds or not engine.up or not (engine.url or engine.url_problem):
                continue
            problem = engine.url_problem or self._policy.check(engine.url)
            if problem:
                self._refuse(engine, problem)
                continue
            wanted[engine.name] = Target(
                engine.name, engine.url, (engine.root_pid, engine.start_ticks, engine.registered_at)
            )
        with self._lock:
            self._refused &= {(e.name, e.url or "") for e in engines}  # a refusal is logged again if it returns
            if wanted == self._targets:
                return
            self._due_at = time.monotonic()  # the loop looks at once
            self._wake.set()
            live = set(wanted.values())
            for gone in set(self._results) | set(self._failures) | set(self._next_poll) | set(self._last_value):
                if gone not in live:
                    self._results.pop(gone, None)
                    self._failures.pop(gone, None)
                    self._next_poll.pop(gone, None)
                    self._last_value.pop(gone, None)
            # A URL whose engine left or changed (a new process under the same URL) is forgotten.
            forgotten = {t.url for t in self._targets.values() if t not in live}
            self._targets = wanted
        for url in forgotten:
            self._client.forget(url)

    def _refuse(self, engine: Engine, problem: str) -> None:
        key = (engine.name, engine.url or "")
        with self._lock:
            first = key not in self._refused
            self._refused.add(key)
        if first:
            reason = "url_unreachable" if engine.url_problem else "url_not_allowed"
            self._errors.inc(self.source, reason)
            log.warning("engine %s: not polling %s: %s", engine.name, engine.url or "its URL", problem)

    # --- polling ---

    def _due(self) -> list[Target]:
        now = time.monotonic()
        with self._lock:
            return [
                t for t in self._targets.values() if t not in self._in_flight and self._next_poll.get(t, 0.0) <= now
            ]

    def _start_due(self) -> list[threading.Thread]:
        threads = []
        for target in self._due():
            if not self._slots.acquire(blocking=False):
                break  # every worker is busy: the rest stay due for the next tick
            with self._lock:
                self._in_flight.add(target)
            thread = threading.Thread(target=self._poll, args=(target,), name=f"{self.source}-poll", daemon=True)
            thread.start()
            threads.append(thread)
        return threads

    def poll_once(self) -> None:
        """Poll every due engine now and wait for them (each bounded by the deadline)."""
        for thread in self._start_due():
            thread.join(self._deadline + 1.0)

    def _getter(self) -> Get:
        """GET for one poll: every request it makes shares the poll's deadline."""
        ends = time.monotonic() + self._deadline

        def get(url: str) -> Response:
            left = ends - time.monotonic()
            if left <= 0:
                raise FetchError("timeout", f"{url}: the poll's {self._deadline:g}s were spent before this request")
            return fetch(url, left, min(self._connect_timeout, left), self._max_bytes)

        return get

    def _poll(self, target: Target) -> None:
        try:
            value: T | None = None
            try:
                value = self._client.poll(target.url.rstrip("/"), self._getter())
                reason = None
            except (FetchError, PollError) as exc:
                reason = exc.reason
                log.debug("engine %s: %s", target.name, exc)
            except Exception:
                reason = "exception"
                log.exception("engine %s: polling %s failed", target.name, target.url)
            if reason is not None:
                self._errors.inc(self.source, reason)
            with self._lock:
                if self._targets.get(target.name) != target:
                    return  # the engine went away or changed while we polled
                failures = 0 if reason is None else self._failures.get(target, 0) + 1
                if reason is None and self._fold is not None:
                    value = self._fold(self._last_value.get(target), value, time.time())
                    self._last_value[target] = value
                self._results[target] = PollResult(reason is None, value, time.monotonic())
                self._failures[target] = failures
                delay = (
                    self._interval if failures == 0 else min(self._max_backoff, self._interval * 2 ** (failures - 1))
                )
                self._next_poll[target] = time.monotonic() + delay
        finally:
            with self._lock:
                self._in_flight.discard(target)
            self._slots.release()

    def results(self, engines: Iterable[Engine]) -> dict[str, PollResult[T]]:
        """The latest result per engine name, for the engines of this snapshot; nothing if the loop stalled."""
        self.track(engines)
        due = self._due_at
        if due is not None and time.monotonic() - due > max(10.0, 5 * self._tick):  # it should have looked
            self._errors.inc(self.source, "stalled")
            return {}
        with self._lock:
            return {t.name: self._results[t] for t in self._targets.values() if t in self._results}

    def last(self, name: str) -> PollResult[T] | None:
        """The latest result for the engine of that name, if it is polled: for readers beside the
        scrape (the JSON API), which must not change what is tracked."""
        with self._lock:
            target = self._targets.get(name)
            return self._results.get(target) if target is not None else None


def parsed(parse: Callable[[bytes], T], body: bytes, where: str, unparsable: str, shape_error: type[ValueError]) -> T:
    """`parse(body)`, its failures as poll errors: unexpected_shape for a body of the wrong shape (the
    parser's `shape_error`, a ValueError), `unparsable` for any other ValueError (no body at all)."""
    try:
        return parse(body)
    except shape_error as exc:
        raise PollError("unexpected_shape", f"{where}: {exc}") from None
    except ValueError as exc:
        raise PollError(unparsable, f"{where}: {exc}") from None
