"""SGLang `/server_info` accounting: what each engine says it allocated at start-up.

These numbers are accounting, never residency: SGLang measures them once at start-up,
so a slept engine still reports its full pools. They sit next to the measured residency
so a reader can compare the two.

The shape has changed across SGLang releases; every shape below is read:
- `internal_states`: one dict per DP rank (older releases: a flat dict, one rank);
- `memory_usage`: `kvcache` and `token_capacity` (oldest), plus `weight`, plus the graph
  memory as `cuda_graph` (a number), `graph` (a number) or `graph` (a dict per phase);
- values in GiB (SGLang writes "GB").
A component that is absent or not a finite non-negative number yields no series.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests
import urllib3
from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.attribution import Snapshot
from exporter.engines import Engine
from exporter.errors import ErrorCounter
from exporter.url_policy import UrlPolicy

log = logging.getLogger(__name__)

GIB = 1024**3
COMPONENTS = ("weight", "kvcache", "graph")


class ShapeError(ValueError):
    """The body is JSON but not a /server_info we understand."""


@dataclass(frozen=True)
class RankAccounting:
    dp_rank: int
    components: dict[str, float]  # component -> bytes
    token_capacity: int | None


def _gib(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return float(value) * GIB


def _graph_bytes(usage: dict) -> float | None:
    graph = usage.get("graph", usage.get("cuda_graph"))
    if isinstance(graph, dict):
        phases = [_gib(v) for v in graph.values()]
        known = [v for v in phases if v is not None]
        return sum(known) if known and len(known) == len(phases) else None
    return _gib(graph)


def parse_server_info(body: bytes | str) -> list[RankAccounting]:
    """Accounting per DP rank from a /server_info (or /get_server_info) body."""
    try:
        info = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(info, dict):
        raise ShapeError("top level is not an object")
    states = info.get("internal_states")
    if isinstance(states, dict):
        states = [states]
    if states is None and "memory_usage" in info:
        states = [info]  # releases that put the state at the top level
    if not isinstance(states, list):
        raise ShapeError("no internal_states list")
    ranks = []
    for dp_rank, state in enumerate(states):
        if not isinstance(state, dict):
            raise ShapeError(f"internal_states[{dp_rank}] is not an object")
        usage = state.get("memory_usage")
        if usage is None:
            ranks.append(RankAccounting(dp_rank, {}, None))  # very old releases: nothing to read
            continue
        if not isinstance(usage, dict):
            raise ShapeError(f"internal_states[{dp_rank}].memory_usage is not an object")
        values = {
            "weight": _gib(usage.get("weight")),
            "kvcache": _gib(usage.get("kvcache")),
            "graph": _graph_bytes(usage),
        }
        capacity = usage.get("token_capacity")
        ranks.append(
            RankAccounting(
                dp_rank,
                {name: value for name, value in values.items() if value is not None},
                capacity if isinstance(capacity, int) and not isinstance(capacity, bool) and capacity >= 0 else None,
            )
        )
    return ranks


@dataclass(frozen=True)
class PollResult:
    ok: bool
    ranks: tuple[RankAccounting, ...] = ()


class FetchError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class SglangPoller:
    """Polls every known SGLang engine in the background; a scrape only reads the results."""

    def __init__(
        self,
        node: str,
        errors: ErrorCounter,
        policy: UrlPolicy,
        interval: float = 15.0,
        connect_timeout: float = 1.0,
        read_timeout: float = 3.0,
        max_bytes: int = 1024 * 1024,
        max_backoff: float = 300.0,
        engines: Callable[[], Iterable[Engine]] | None = None,
    ) -> None:
        """`engines`: how the background loop learns the engines without waiting for a scrape."""
        self._node = node
        self._errors = errors
        self._policy = policy
        self._interval = interval
        self._timeouts = (connect_timeout, read_timeout)
        self._deadline = connect_timeout + read_timeout
        self._max_bytes = max_bytes
        self._max_backoff = max_backoff
        self._lock = threading.Lock()
        self._engines: dict[str, str] = {}  # name -> url
        self._results: dict[str, PollResult] = {}
        self._paths: dict[str, str] = {}  # url -> the info path that worked
        self._next_poll: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._refused: set[tuple[str, str]] = set()
        self._session = requests.Session()
        self._session.trust_env = False  # never go through a proxy from the environment
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sglang")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._engine_source = engines

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sglang-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def track(self, engines: Iterable[Engine]) -> None:
        """The engines to poll: live SGLang engines with an allowed URL."""
        wanted = {}
        for engine in engines:
            if engine.kind != "sglang" or not engine.url or not engine.up:
                continue
            problem = self._policy.check(engine.url)
            if problem:
                with self._lock:
                    first = (engine.name, engine.url) not in self._refused
                    self._refused.add((engine.name, engine.url))
                if first:
                    self._errors.inc("sglang", "url_not_allowed")
                    log.warning("engine %s: not polling %s: %s", engine.name, engine.url, problem)
                continue
            wanted[engine.name] = engine.url
        with self._lock:
            if wanted != self._engines:
                for gone in set(self._results) - set(wanted):
                    self._results.pop(gone, None)
                self._engines = wanted

    def poll_once(self) -> None:
        """Poll every engine that is due, in parallel, bounded by the per-request deadline."""
        now = time.monotonic()
        with self._lock:
            due = [(n, u) for n, u in self._engines.items() if self._next_poll.get(n, 0.0) <= now]
        futures = [self._pool.submit(self._poll, name, url) for name, url in due]
        for future in futures:
            future.result()

    def _loop(self) -> None:
        refreshed = 0.0
        while not self._stop.is_set():
            try:
                # Learn new engines at the poll interval (5 s at most), not on every tick.
                if self._engine_source is not None and time.monotonic() - refreshed >= min(self._interval, 5.0):
                    refreshed = time.monotonic()
                    self.track(self._engine_source())
                self.poll_once()
            except RuntimeError:  # the pool was shut down under us
                return
            self._stop.wait(min(1.0, self._interval))

    def _poll(self, name: str, url: str) -> None:
        try:
            ranks = parse_server_info(self._fetch(url))
            result, failures = PollResult(True, tuple(ranks)), 0
        except FetchError as exc:
            log.debug("engine %s: %s", name, exc)
            self._errors.inc("sglang", exc.reason)
            result, failures = PollResult(False), self._failures.get(name, 0) + 1
        except ShapeError as exc:
            log.debug("engine %s: unexpected /server_info: %s", name, exc)
            self._errors.inc("sglang", "unexpected_shape")
            result, failures = PollResult(False), self._failures.get(name, 0) + 1
        except ValueError as exc:
            log.debug("engine %s: %s", name, exc)
            self._errors.inc("sglang", "bad_json")
            result, failures = PollResult(False), self._failures.get(name, 0) + 1
        delay = self._interval if failures == 0 else min(self._max_backoff, self._interval * 2 ** (failures - 1))
        with self._lock:
            if self._engines.get(name) != url:
                return  # the engine went away or moved while we polled
            self._results[name] = result
            self._failures[name] = failures
            self._next_poll[name] = time.monotonic() + delay

    def _fetch(self, url: str) -> bytes:
        base = url.rstrip("/")
        paths = [self._paths[base]] if base in self._paths else ["/server_info", "/get_server_info"]
        for path in paths:
            status, body = self._get(base + path)
            if status == 404 and path == "/server_info" and len(paths) > 1:
                continue  # releases before /server_info
            if status != 200:
                raise FetchError("status", f"{base}{path}: HTTP {status}")
            self._paths[base] = path
            return body
        raise FetchError("status", f"{base}: no server info endpoint")

    def _get(self, url: str) -> tuple[int, bytes]:
        """GET with connect/read timeouts, a whole-response deadline and a size cap."""
        started = time.monotonic()
        try:
            with self._session.get(url, timeout=self._timeouts, stream=True, allow_redirects=False) as response:
                chunks, size = [], 0
                # read1 returns what has arrived, so a trickling body meets the deadline check
                while chunk := response.raw.read1(65536):
                    size += len(chunk)
                    if size > self._max_bytes:
                        raise FetchError("too_large", f"{url}: body over {self._max_bytes} bytes")
                    if time.monotonic() - started > self._deadline:
                        raise FetchError("timeout", f"{url}: body not complete in {self._deadline:.0f}s")
                    chunks.append(chunk)
                return response.status_code, b"".join(chunks)
        except (requests.Timeout, urllib3.exceptions.TimeoutError):
            raise FetchError("timeout", f"{url}: timed out") from None
        except urllib3.exceptions.HTTPError as exc:
            raise FetchError("unreachable", f"{url}: {type(exc).__name__}") from None
        except requests.RequestException as exc:
            raise FetchError("unreachable", f"{url}: {type(exc).__name__}") from None

    def families(self, snapshot: Snapshot) -> Iterable[Metric]:
        self.track(snapshot.engines)
        with self._lock:
            results = {name: self._results[name] for name in self._engines if name in self._results}
        up = GaugeMetricFamily(
            "gpu_residency_sglang_up",
            "1 when the last /server_info poll of the engine succeeded.",
            labels=["node", "engine"],
        )
        memory = GaugeMetricFamily(
            "gpu_residency_sglang_memory_bytes",
            "SGLang's own start-up accounting per DP rank (weight, kvcache, graph); not residency: a slept engine "
            "still reports its pools.",
            labels=["node", "engine", "dp_rank", "component"],
        )
        capacity = GaugeMetricFamily(
            "gpu_residency_sglang_token_capacity",
            "KV cache token capacity per DP rank, from /server_info.",
            labels=["node", "engine", "dp_rank"],
        )
        for name, result in sorted(results.items()):
            up.add_metric([self._node, name], 1 if result.ok else 0)
            for rank in result.ranks:
                for component in COMPONENTS:
                    if component in rank.components:
                        memory.add_metric([self._node, name, str(rank.dp_rank), component], rank.components[component])
                if rank.token_capacity is not None:
                    capacity.add_metric([self._node, name, str(rank.dp_rank)], rank.token_capacity)
        yield up
        yield memory
        yield capacity
