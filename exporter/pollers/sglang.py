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

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.errors import ErrorCounter
from exporter.pollers.poller import EnginePoller, Get, PollError
from exporter.pollers.url_policy import UrlPolicy
from exporter.snapshot.attribution import Snapshot
from gpu_residency_common.files import parse_json_as

GIB = 1024**3
COMPONENTS = ("weight", "kvcache", "graph")
INFO_PATHS = ("/server_info", "/get_server_info")  # newest first; /get_server_info before 0.5


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
    info = parse_json_as(ValueError, body)
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


class SglangClient:
    """Reads /server_info, or /get_server_info on releases before it, remembering which worked."""

    def __init__(self) -> None:
        self._paths: dict[str, str] = {}
        self._lock = threading.Lock()

    def poll(self, base_url: str, get: Get) -> tuple[RankAccounting, ...]:
        with self._lock:
            known = self._paths.get(base_url)
        for path in (known,) if known else INFO_PATHS:
            response = get(base_url + path)
            if response.status == 404 and known is None and path != INFO_PATHS[-1]:
                continue  # a release before /server_info
            if response.status != 200:
                raise PollError("status", f"{base_url}{path}: HTTP {response.status}")
            try:
                ranks = parse_server_info(response.body)
            except ShapeError as exc:
                raise PollError("unexpected_shape", f"{base_url}{path}: {exc}") from None
            except ValueError as exc:
                raise PollError("bad_json", f"{base_url}{path}: {exc}") from None
            with self._lock:
                self._paths[base_url] = path
            return tuple(ranks)
        raise PollError("status", f"{base_url}: no server info endpoint")

    def forget(self, base_url: str) -> None:
        with self._lock:
            self._paths.pop(base_url.rstrip("/"), None)


class SglangPoller(EnginePoller[tuple[RankAccounting, ...]]):
    """SGLang accounting polled in the background; a scrape only reads the results."""

    def __init__(self, node: str, errors: ErrorCounter, policy: UrlPolicy, **settings: Any) -> None:
        """`settings`: EnginePoller's (interval, timeouts, max_bytes, max_backoff, engines)."""
        super().__init__("sglang", ("sglang",), SglangClient(), errors, policy, **settings)
        self._node = node

    def families(self, snapshot: Snapshot) -> Iterable[Metric]:
        results = self.results(snapshot.engines)
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
            for rank in result.value or ():
                for component in COMPONENTS:
                    if component in rank.components:
                        memory.add_metric([self._node, name, str(rank.dp_rank), component], rank.components[component])
                if rank.token_capacity is not None:
                    capacity.add_metric([self._node, name, str(rank.dp_rank)], rank.token_capacity)
        yield up
        yield memory
        yield capacity
