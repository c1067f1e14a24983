"""vLLM's per-resource sleep state and its sleep-mode operation timings, as our own series.

Newer vLLM (docs/design/engine_sleep_state.md) publishes the state of each resource per engine:
the scheduler (running, paused), the weights (resident, offloaded, discarded, unknown) and the
KV cache (resident, released, unknown), plus `vllm:engine_fully_awake`. `unknown` follows a
failed sleep or wake RPC: vLLM cannot say whether the memory went, and the engine has to be
rebuilt; it is never counted as released here. Its frontend also times each sleep-mode call
(`vllm:rl_sleep_mode_operation_duration_seconds{operation}`, before that without `rl_`) and
counts the calls awaited now.

Where a resource is `unknown`, gpu_residency_engine_release_unknown marks each GPU the engine
holds memory on, with the UUID the gate asks by, so that its explanation can say why the memory
counts as held.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from exporter.pollers.vllm_parse import RankAccounting, SleepReport, Timing


class _Status(Protocol):
    ranks: tuple[RankAccounting, ...]
    sleep: SleepReport | None
    timings: dict[str, Timing]
    in_flight: dict[str, float]


def resource_families(
    node: str, statuses: Mapping[str, _Status], gpus: Mapping[str, Iterable[tuple[str, str]]]
) -> Iterable[Metric]:
    """The five families, from each engine's last successful poll (absent where vLLM does not say);
    `gpus`: engine -> (index, uuid) of each GPU it holds memory on."""
    state = GaugeMetricFamily(
        "gpu_residency_vllm_resource_state",
        "vLLM's own state of each resource of a data-parallel engine (scheduler running|paused; weights "
        "resident|offloaded|discarded|unknown; kv_cache resident|released|unknown): 1 for the current state. "
        "unknown follows a failed sleep or wake: the memory is not known to be released and counts as held.",
        labels=["node", "engine", "dp_rank", "resource", "state"],
    )
    awake = GaugeMetricFamily(
        "gpu_residency_vllm_fully_awake",
        "1 when vLLM says the data-parallel engine is fully awake (scheduling, weights and KV cache resident), "
        "else 0 (vllm:engine_fully_awake).",
        labels=["node", "engine", "dp_rank"],
    )
    duration = HistogramMetricFamily(
        "gpu_residency_vllm_operation_duration_seconds",
        "vLLM's own timing of its sleep-mode calls (sleep, wake, release_kv_cache_memory), cumulative since the "
        "server started; the call's time, not the memory's: gpu_residency_engine_release_seconds measures that.",
        labels=["node", "engine", "operation"],
    )
    flight = GaugeMetricFamily(
        "gpu_residency_vllm_operations_in_flight",
        "vLLM sleep-mode calls being awaited now, per operation.",
        labels=["node", "engine", "operation"],
    )
    unknown = GaugeMetricFamily(
        "gpu_residency_engine_release_unknown",
        "1 on each GPU an engine holds memory on while its own report cannot say a resource was released (vLLM's "
        "unknown after a failed sleep or wake): that memory counts as held, and the gate says so.",
        labels=["node", "engine", "gpu", "uuid", "resource"],
    )
    for name, status in sorted(statuses.items()):
        for resource in status.sleep.unknown if status.sleep is not None else ():
            for index, uuid in gpus.get(name, ()):
                unknown.add_metric([node, name, index, uuid, resource], 1)
        for rank in status.ranks:
            for resource, current in rank.resources:
                state.add_metric([node, name, rank.dp_rank, resource, current], 1)
            if rank.fully_awake is not None:
                awake.add_metric([node, name, rank.dp_rank], 1 if rank.fully_awake else 0)
        for operation, timing in sorted(status.timings.items()):
            duration.add_metric([node, name, operation], list(timing.buckets), timing.sum)
        for operation, count in sorted(status.in_flight.items()):
            flight.add_metric([node, name, operation], count)
    yield from (state, awake, duration, flight, unknown)
