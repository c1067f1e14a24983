"""SGLang's start-up accounting per engine, polled in the background (exporter.pollers.sglang_parse
reads /server_info, exporter.pollers.sglang_metrics /metrics): accounting, never residency: a
slept engine still reports its full pools."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.errors import ErrorCounter
from exporter.pollers.http_fetch import FetchError
from exporter.pollers.poller import EnginePoller, Get, PollError, parsed
from exporter.pollers.sglang_metrics import parse_metrics
from exporter.pollers.sglang_parse import COMPONENTS, RankAccounting, ShapeError, parse_server_info
from exporter.pollers.url_policy import UrlPolicy
from exporter.snapshot.attribution import Snapshot

INFO_PATHS = ("/server_info", "/get_server_info")  # newest first; /get_server_info before 0.5
METRICS_PATH = "/metrics"  # newer releases with --enable-metrics: the same figures as gauges


class SglangClient:
    """Reads /server_info, or /get_server_info on releases before it, remembering which worked.

    Where neither exists (404), or /server_info outlived the poll's deadline (it waits on the
    scheduler, busy or stuck), the engine is read from /metrics (exporter.pollers.sglang_metrics)
    from then on; /metrics without the memory gauges sends it back to /server_info next time."""

    def __init__(self) -> None:
        self._paths: dict[str, str] = {}
        self._lock = threading.Lock()

    def poll(self, base_url: str, get: Get) -> tuple[RankAccounting, ...]:
        with self._lock:
            known = self._paths.get(base_url)
        if known == METRICS_PATH:
            return self._from_metrics(base_url, get)
        for path in (known,) if known else INFO_PATHS:
            try:
                response = get(base_url + path)
            except FetchError as exc:
                if exc.reason == "timeout":
                    self._remember(base_url, METRICS_PATH)  # slow: the next poll reads /metrics
                raise
            if response.status == 404 and known is None:
                continue  # a release before /server_info, or one without either
            if response.status != 200:
                raise PollError("status", f"{base_url}{path}: HTTP {response.status}")
            ranks = parsed(parse_server_info, response.body, base_url + path, "bad_json", ShapeError)
            self._remember(base_url, path)
            return tuple(ranks)
        return self._from_metrics(base_url, get)

    def _from_metrics(self, base_url: str, get: Get) -> tuple[RankAccounting, ...]:
        response = get(base_url + METRICS_PATH)
        try:
            if response.status != 200:
                raise PollError("status", f"{base_url}{METRICS_PATH}: HTTP {response.status} (no server info endpoint)")
            ranks = parsed(parse_metrics, response.body, base_url + METRICS_PATH, "bad_metrics", ShapeError)
            if ranks is None:
                raise PollError("status", f"{base_url}{METRICS_PATH}: no memory gauges (an older SGLang)")
        except PollError:
            self.forget(base_url)  # the next poll tries /server_info again
            raise
        self._remember(base_url, METRICS_PATH)
        return ranks

    def _remember(self, base_url: str, path: str) -> None:
        with self._lock:
            self._paths[base_url] = path

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
            "1 when the last poll of the engine's accounting (/server_info, or /metrics where that is absent or "
            "slow) succeeded.",
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
        startup = GaugeMetricFamily(
            "gpu_residency_sglang_startup_available_bytes",
            "GPU memory SGLang found free when the engine started, per DP rank (newer releases): less than the "
            "card's free memory means another tenant held the GPU then.",
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
                if rank.startup_available is not None:
                    startup.add_metric([self._node, name, str(rank.dp_rank)], rank.startup_available)
        yield from (up, memory, capacity, startup)
