"""SGLang's start-up accounting per engine, polled in the background (exporter.pollers.sglang_parse
reads the bodies): accounting, never residency: a slept engine still reports its full pools."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.errors import ErrorCounter
from exporter.pollers.poller import EnginePoller, Get, PollError
from exporter.pollers.sglang_parse import COMPONENTS, RankAccounting, ShapeError, parse_server_info
from exporter.pollers.url_policy import UrlPolicy
from exporter.snapshot.attribution import Snapshot

INFO_PATHS = ("/server_info", "/get_server_info")  # newest first; /get_server_info before 0.5


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
