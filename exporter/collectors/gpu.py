"""`--collector.gpu`: whole-GPU used, total and reserved memory, as NVML read them this collection."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.collectors.names import PREFIX
from exporter.snapshot.attribution import Snapshot
from exporter.sources.nvml import GpuReading

GPU_LABELS = ["node", "gpu", "uuid", "pci_bus_id", "model"]


def _gpu_labels(node: str, gpu: GpuReading) -> list[str]:
    return [node, str(gpu.index), gpu.uuid, gpu.pci_bus_id, gpu.model]


def gpu_families(node: str, snapshot: Snapshot) -> Iterable[Metric]:
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
