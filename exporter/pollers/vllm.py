"""vLLM: the engine's own word on whether it sleeps, and its KV-cache accounting.

Unlike SGLang, vLLM says whether it is asleep, in one of two ways depending on its release:
- `/metrics` (0.11.1 and later): `vllm:engine_sleep_state{engine, model_name, sleep_state}`, one
  0/1 gauge per state per engine (`engine` is the data-parallel engine index): `awake`,
  `weights_offloaded` (level 1: weights copied to CPU memory, KV cache dropped) and `discard_all`
  (level 2: both dropped). All three are 0 after a level-0 sleep or `/release_kv_cache_memory`
  (0.33 and later: scheduling paused, or only the KV cache freed; the weights stay on the GPU).
- `/metrics`, newer (vllm-project/vllm docs/design/engine_sleep_state.md at 13cbd441):
  `vllm:engine_sleep_resource_state{engine, resource, state}` per resource and
  `vllm:engine_fully_awake`; where present they decide (exporter.pollers.vllm_resources).
- `GET /is_sleeping` -> `{"is_sleeping": bool}` (older releases; only with VLLM_SERVER_DEV_MODE=1),
  which does not say the level.
Each poll reads /metrics (prometheus_client's own parser) and, when it has no sleep state,
/is_sleeping; a 404 there (dev mode off) is remembered for that engine, which then has no
observed state, only its accounting.

Sleep levels 1 and 2 free the same GPU memory (the weights and the KV cache; level 1 keeps a
copy of the weights in pinned host memory, level 2 keeps only the model's small buffers there),
so both are held to the release floor. Level 0 keeps the weights on the GPU: no release is
expected, none is timed.

The KV cache figures are vLLM's own accounting, never residency: `vllm:kv_cache_usage_perc`
(0..1; `vllm:gpu_cache_usage_perc` before 0.11, gone in 0.12) and the capacity in the labels of
`vllm:cache_config_info`: `num_gpu_blocks`, `block_size` and, from 0.24, `kv_cache_size_tokens`
(right for hybrid and sliding-window models, where blocks x block size is not; with data
parallelism vLLM reports the blocks summed over its engines). The label set changes between
releases: labels are read by name, a value that is not a count ("None") is absent.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.engines.catalog import Engine
from exporter.errors import ErrorCounter
from exporter.pollers.poller import EnginePoller, Get, PollError, parsed
from exporter.pollers.url_policy import UrlPolicy
from exporter.pollers.vllm_parse import (
    RankAccounting,
    ShapeError,
    SleepReport,
    Timing,
    parse_is_sleeping,
    parse_metrics,
)
from exporter.pollers.vllm_resources import resource_families
from exporter.sleep_wake.states import Observed
from exporter.snapshot.attribution import Snapshot

MAX_METRICS_BYTES = 4 * 1024 * 1024  # /metrics with many DP engines and histograms runs to a few hundred KiB


@dataclass(frozen=True)
class VllmStatus:
    ranks: tuple[RankAccounting, ...]
    sleep: SleepReport | None  # None: this vLLM does not say whether it sleeps
    via: str = ""  # metrics | is_sleeping | "" (no state)
    timings: dict[str, Timing] = dataclasses.field(default_factory=dict)  # vLLM's own, per operation
    in_flight: dict[str, float] = dataclasses.field(default_factory=dict)  # operations awaited now
    # Filled in across polls (VllmPoller._fold):
    polled_at: float | None = None  # wall time of this poll
    # When this sleep state began: the poll that first saw it, or, where vLLM timed the one operation that
    # changed it, that poll less the operation's duration (its latest possible start); None: so at the first look.
    since: float | None = None
    before: float | None = None  # the last poll that saw the previous state


class VllmClient:
    """One poll: /metrics, then /is_sleeping when /metrics has no sleep state and the engine has it."""

    def __init__(self) -> None:
        self._without_is_sleeping: set[str] = set()  # base URLs that answered 404 (dev mode off)
        self._lock = threading.Lock()

    def poll(self, base_url: str, get: Get) -> VllmStatus:
        ranks: tuple[RankAccounting, ...] = ()
        sleep = None
        timings: dict[str, Timing] = {}
        in_flight: dict[str, float] = {}
        response = get(base_url + "/metrics")
        if response.status == 200:
            report = parsed(parse_metrics, response.body, f"{base_url}/metrics", "bad_metrics", ShapeError)
            ranks, sleep, timings, in_flight = report.ranks, report.sleep, report.timings, report.in_flight
        elif response.status != 404:
            raise PollError("status", f"{base_url}/metrics: HTTP {response.status}")
        if sleep is not None:
            return VllmStatus(ranks, sleep, "metrics", timings, in_flight)
        with self._lock:
            without = base_url in self._without_is_sleeping
        if not without:
            answer = get(base_url + "/is_sleeping")
            if answer.status == 200:
                sleep = parsed(parse_is_sleeping, answer.body, f"{base_url}/is_sleeping", "bad_json", ShapeError)
                return VllmStatus(ranks, sleep, "is_sleeping", timings, in_flight)
            if answer.status != 404:
                raise PollError("status", f"{base_url}/is_sleeping: HTTP {answer.status}")
            with self._lock:
                self._without_is_sleeping.add(base_url)
        if response.status == 404:
            raise PollError("status", f"{base_url}: neither /metrics nor /is_sleeping (not a vLLM server?)")
        return VllmStatus(ranks, None, "", timings, in_flight)

    def forget(self, base_url: str) -> None:
        with self._lock:
            self._without_is_sleeping.discard(base_url.rstrip("/"))


def _took(previous: VllmStatus, new: VllmStatus, operation: str) -> float | None:
    """How long the one `operation` vLLM completed between two polls took, by its own histogram; None
    unless exactly one completed (none: the change came another way; several: which one is unknown).
    vLLM creates an operation's histogram at its first call: absent before, it had none."""
    after = new.timings.get(operation)
    if after is None or previous.via != "metrics":
        return None
    before = previous.timings.get(operation)
    count, total = (before.count, before.sum) if before else (0.0, 0.0)
    if after.count - count != 1:
        return None
    took = after.sum - total
    return took if took >= 0 else None


class VllmPoller(EnginePoller[VllmStatus]):
    """vLLM's sleep state and KV-cache accounting, polled in the background; a scrape only reads them."""

    def __init__(self, node: str, errors: ErrorCounter, policy: UrlPolicy, **settings: Any) -> None:
        """`settings`: EnginePoller's (interval 2 s and /metrics up to MAX_METRICS_BYTES by default here)."""
        settings.setdefault("interval", 2.0)
        settings.setdefault("max_bytes", MAX_METRICS_BYTES)
        super().__init__("vllm", ("vllm",), VllmClient(), errors, policy, fold=self._fold, **settings)
        self._node = node
        self.changes = 0  # observed sleep-state changes so far (EngineStates' watcher looks again)

    def _fold(self, previous: VllmStatus | None, new: VllmStatus, at: float) -> VllmStatus:
        """Carry when the sleep state last changed from poll to poll (of one engine identity)."""
        new = dataclasses.replace(new, polled_at=at)
        if new.sleep is None:
            return new
        if previous is None or previous.sleep is None:
            return new  # the first look: when it began is unknown
        if previous.sleep.sleeping == new.sleep.sleeping:
            return dataclasses.replace(new, since=previous.since, before=previous.before)
        self.changes += 1
        took = _took(previous, new, "sleep" if new.sleep.sleeping else "wake")
        return dataclasses.replace(new, since=at if took is None else at - took, before=previous.polled_at)

    def observed(self, engines: Iterable[Engine]) -> dict[str, Observed]:
        """The sleep state each vLLM engine reports, for the engines whose last poll said."""
        out = {}
        for name, result in self.results(engines).items():
            status = result.value
            if not result.ok or status is None or status.sleep is None:
                continue
            sleeping, level = status.sleep.sleeping, status.sleep.level
            out[name] = Observed(
                "asleep" if sleeping else "active",
                level=level,
                since=status.since,
                before=status.before,
                release_expected=not sleeping or level != 0,
            )
        return out

    def families(self, snapshot: Snapshot) -> Iterable[Metric]:
        results = self.results(snapshot.engines)
        node = self._node
        up = GaugeMetricFamily(
            "gpu_residency_vllm_up",
            "1 when the last poll of the vLLM engine (/metrics, and /is_sleeping where /metrics has no sleep state) "
            "succeeded.",
            labels=["node", "engine"],
        )
        level = GaugeMetricFamily(
            "gpu_residency_vllm_sleep_level",
            "While a vLLM engine reports itself asleep: its sleep level (1: weights offloaded to CPU memory, 2: "
            "weights discarded, both free the GPU; 0: scheduling paused or only the KV cache freed, the weights stay "
            "on the GPU). Absent while awake, or when the engine does not say (/is_sleeping).",
            labels=["node", "engine"],
        )
        usage = GaugeMetricFamily(
            "gpu_residency_vllm_kv_cache_usage_ratio",
            "Engine accounting, not residency: the share of vLLM's KV cache blocks in use (vllm:kv_cache_usage_perc), "
            "per data-parallel engine.",
            labels=["node", "engine", "dp_rank"],
        )
        tokens = GaugeMetricFamily(
            "gpu_residency_vllm_kv_cache_capacity_tokens",
            "Engine accounting, not residency: the KV cache's configured capacity in tokens (vLLM 0.24+ "
            "cache_config_info kv_cache_size_tokens), per data-parallel engine.",
            labels=["node", "engine", "dp_rank"],
        )
        blocks = GaugeMetricFamily(
            "gpu_residency_vllm_kv_cache_capacity_blocks",
            "Engine accounting, not residency: the KV cache's GPU blocks as vLLM reports them (cache_config_info "
            "num_gpu_blocks; with data parallelism, summed over the engines).",
            labels=["node", "engine", "dp_rank"],
        )
        block_size = GaugeMetricFamily(
            "gpu_residency_vllm_kv_cache_block_size_tokens",
            "Engine accounting: tokens per KV cache block (cache_config_info block_size).",
            labels=["node", "engine", "dp_rank"],
        )
        for name, result in sorted(results.items()):
            up.add_metric([node, name], 1 if result.ok else 0)
            status = result.value
            if not result.ok or status is None:
                continue
            if status.sleep is not None and status.sleep.sleeping and status.sleep.level is not None:
                level.add_metric([node, name], status.sleep.level)
            for rank in status.ranks:
                labels = [node, name, rank.dp_rank]
                for family, value in ((usage, rank.kv_usage), (tokens, rank.tokens), (blocks, rank.blocks),
                                      (block_size, rank.block_size)):  # fmt: skip
                    if value is not None:
                        family.add_metric(labels, value)
        yield from (up, level, usage, tokens, blocks, block_size)
        statuses = {name: r.value for name, r in sorted(results.items()) if r.ok and r.value}
        gpus: dict[str, set[tuple[str, str]]] = {}
        for usage in snapshot.engine_usage:
            gpus.setdefault(usage.engine, set()).add((str(usage.gpu.index), usage.gpu.uuid))
        yield from resource_families(node, statuses, {name: sorted(held) for name, held in gpus.items()})

    def unknown_resources(self, engine: str) -> tuple[str, ...]:
        """The resources the engine's last poll could not vouch for (vLLM's `unknown`): not released."""
        result = self.last(engine)
        status = result.value if result is not None and result.ok else None
        return status.sleep.unknown if status is not None and status.sleep is not None else ()
