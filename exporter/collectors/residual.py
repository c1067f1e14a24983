"""The two residuals the fleet reads, computed where the numbers already are: per GPU, the memory
outside every engine, and the memory no recognised holder claims. Published by the exporter so the
rules no longer rebuild them from four families on every evaluation (issue 26: those two recording
rules were ~28 ms of every evaluation at 100 nodes). Unknown is absent: a GPU whose used memory, or
one of whose engines' or holders' memory, NVML could not give has no residual this collection."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.collectors.names import PREFIX
from exporter.snapshot.attribution import Snapshot

LABELS = ["node", "gpu", "uuid"]


def _residuals(snapshot: Snapshot, held: Iterable[tuple[str, int | None]]) -> Iterable[tuple[object, int]]:
    """(gpu, used minus what `held` says is held on it) for every GPU where all of it is known."""
    by_gpu: dict[str, int | None] = {}
    for uuid, used in held:
        by_gpu[uuid] = None if used is None or by_gpu.get(uuid, 0) is None else by_gpu.get(uuid, 0) + used
    for gpu in snapshot.nvml.gpus:
        claimed = by_gpu.get(gpu.uuid, 0)
        if gpu.used_bytes is not None and gpu.processes is not None and claimed is not None:
            yield gpu, gpu.used_bytes - claimed


def residual_families(node: str, snapshot: Snapshot) -> Iterable[Metric]:
    outside = GaugeMetricFamily(
        PREFIX + "residual_outside_engines_bytes",
        "Whole-GPU used minus what every engine's process tree holds on it: memory outside any engine (what blocks "
        "the next wake-up when no engine is to blame). A GPU with no engine memory counts in full.",
        labels=LABELS,
    )
    engines = ((usage.gpu.uuid, usage.used_bytes) for usage in snapshot.engine_usage)
    for gpu, value in _residuals(snapshot, engines):
        outside.add_metric([node, str(gpu.index), gpu.uuid], value)
    yield outside
    unclaimed = GaugeMetricFamily(
        PREFIX + "residual_unclaimed_bytes",
        "Whole-GPU used minus what every recognised holder holds (engines, trainers, Ray actors, titled vLLM/SGLang "
        "workers): memory of plain processes nobody recognised (orphans) or of no listed process (leaked contexts).",
        labels=LABELS,
    )
    holders = ((u.gpu.uuid, u.used_bytes) for u in snapshot.holder_usage if u.holder.kind != "process")
    for gpu, value in _residuals(snapshot, holders):
        unclaimed.add_metric([node, str(gpu.index), gpu.uuid], value)
    yield unclaimed
