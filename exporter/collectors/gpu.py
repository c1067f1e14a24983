"""`--collector.gpu`: whole-GPU used, total and reserved memory, as NVML read them this collection,
and the same per MIG device in families of their own (summing them never adds to a GPU's)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.collectors.names import PREFIX
from exporter.snapshot.attribution import Snapshot
from exporter.sources.nvml import GpuReading
from gpu_residency_common.nvml_mig import MigReading

GPU_LABELS = ["node", "gpu", "uuid", "pci_bus_id", "model"]
# A MIG device: its parent GPU (index, UUID), its GI/CI ids, profile and own MIG-... UUID.
MIG_LABELS = ["node", "gpu", "uuid", "mig_instance", "mig_profile", "mig_uuid"]


def _gpu_labels(node: str, gpu: GpuReading) -> list[str]:
    return [node, str(gpu.index), gpu.uuid, gpu.pci_bus_id, gpu.model]


def mig_labels(node: str, gpu: GpuReading, mig: MigReading) -> list[str]:
    instance = mig.instance
    return [node, str(gpu.index), gpu.uuid, instance.label, instance.profile, instance.uuid]


def gpu_families(node: str, snapshot: Snapshot) -> Iterable[Metric]:
    yield from _whole_gpu_families(node, snapshot)
    specs = (
        ("mig_memory_used_bytes", "used_bytes", "GPU memory in use on one MIG device (NVML), part of its GPU's."),
        ("mig_memory_total_bytes", "total_bytes", "Memory size of one MIG device (NVML)."),
    )
    for name, field, doc in specs:
        family = GaugeMetricFamily(PREFIX + name, doc, labels=MIG_LABELS)
        for gpu in snapshot.nvml.gpus:
            for mig in gpu.mig or ():
                value = getattr(mig, field)
                if value is not None and not mig.shared:  # a GPU instance's memory, once
                    family.add_metric(mig_labels(node, gpu, mig), value)
        yield family


def _whole_gpu_families(node: str, snapshot: Snapshot) -> Iterable[Metric]:
    specs = (
        ("memory_used_bytes", "used_bytes", "GPU memory in use, whole card (NVML), the wake-up gate's signal."),
        ("memory_total_bytes", "total_bytes", "GPU memory size (NVML)."),
        ("memory_reserved_bytes", "reserved_bytes", "GPU memory reserved by the driver (NVML memory info v2)."),
    )
    for name, field, doc in specs:
        family = GaugeMetricFamily(PREFIX + name, doc, labels=GPU_LABELS)
        for gpu in snapshot.nvml.gpus:
            value = getattr(gpu, field)
            if value is not None:
                family.add_metric(_gpu_labels(node, gpu), value)
        yield family
