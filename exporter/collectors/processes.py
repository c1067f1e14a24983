"""`--collector.processes`: per-process, per-holder, per-engine and unattributed memory, the two
residuals (exporter/collectors/residual.py) and engine_up, from the snapshot's attribution."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.collectors.gpu import MIG_LABELS, mig_labels
from exporter.collectors.names import PREFIX
from exporter.collectors.residual import per_gpu_family, residual_families
from exporter.snapshot.attribution import Snapshot
from gpu_residency_common.nvml_mig import MigReading


def process_families(node: str, snapshot: Snapshot) -> Iterable[Metric]:
    processes = GaugeMetricFamily(
        PREFIX + "process_memory_bytes",
        "GPU memory used by one process (NVML); engine is '' for a process in no known engine, holder names it "
        "anyway (its engine, Ray actor class, launcher or title; else its comm).",
        labels=["node", "gpu", "uuid", "pid", "comm", "engine", "container_id", "pod_uid", "holder", "holder_kind",
                "mig_instance", "mig_uuid"],
    )  # fmt: skip
    for proc in snapshot.processes:
        if proc.used_bytes is not None:
            processes.add_metric(
                [node, str(proc.gpu.index), proc.gpu.uuid, str(proc.pid), proc.comm, proc.engine, proc.container_id,
                 proc.pod_uid, proc.holder.name, proc.holder.kind, *_on(proc.mig)],
                proc.used_bytes,
            )  # fmt: skip
    yield processes
    holders = GaugeMetricFamily(
        PREFIX + "holder_memory_bytes",
        "GPU memory per holder on one GPU: engines, and unregistered holders named from the node (Ray actor "
        "classes, torchrun/Megatron launchers, vLLM/SGLang titles, else the comm); kind says which.",
        labels=["node", "gpu", "uuid", "holder", "kind", "pod_uid"],
    )
    for usage in snapshot.holder_usage:
        if usage.used_bytes is not None:
            holders.add_metric(
                [node, str(usage.gpu.index), usage.gpu.uuid, usage.holder.name, usage.holder.kind, usage.pod_uid],
                usage.used_bytes,
            )
    yield holders
    engine_memory = GaugeMetricFamily(
        PREFIX + "engine_memory_bytes",
        "GPU memory held by an engine's whole process tree on one GPU; on a MIG GPU one series per MIG device "
        "it holds (mig_instance GI/CI, mig_uuid), which sum to its GPU figure.",
        labels=["node", "engine", "gpu", "uuid", "mig_instance", "mig_uuid"],
    )
    for usage in snapshot.engine_usage:
        if usage.used_bytes is not None:
            labels = [node, usage.engine, str(usage.gpu.index), usage.gpu.uuid, *_on(usage.mig)]
            engine_memory.add_metric(labels, usage.used_bytes)
    yield engine_memory
    yield per_gpu_family(
        "unattributed_memory_bytes",
        "GPU memory used minus the sum of all listed processes (high: PIDs not visible, e.g. no hostPID).",
        node,
        snapshot.unattributed,
    )
    mig_unattributed = GaugeMetricFamily(
        PREFIX + "mig_unattributed_memory_bytes",
        "One MIG device's used memory minus the processes NVML places on it (high: processes hidden from the "
        "host, as in some vGPU setups); absent when a process of its GPU could not be placed.",
        labels=MIG_LABELS,
    )
    for gpu, mig, value in snapshot.mig_unattributed:
        mig_unattributed.add_metric(mig_labels(node, gpu, mig), value)
    yield mig_unattributed
    yield from residual_families(node, snapshot)
    engine_up = GaugeMetricFamily(
        PREFIX + "engine_up",
        "1 while the engine's root process lives (same PID and start time), else 0.",
        labels=["node", "engine", "kind"],
    )
    for engine in snapshot.engines:
        engine_up.add_metric([node, engine.name, engine.kind], 1 if engine.up else 0)
    yield engine_up


def _on(mig: MigReading | None) -> list[str]:
    """mig_instance and mig_uuid: '' on a whole GPU (or a process NVML did not place)."""
    return ["", ""] if mig is None else [mig.instance.label, mig.instance.uuid]
