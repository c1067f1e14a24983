"""The prometheus_client Collector: one fresh set of families per scrape.

Building the families per scrape (no long-lived labelled Gauges) means a process or
engine that disappears leaves no stale series. Concurrent scrapes share one collection:
a scrape that waited while another collected reuses that result instead of hitting NVML
and /proc again.

Each concern (GPU memory, processes, SGLang accounting, exits, sleep/wake, gate records)
is collected in isolation, as node_exporter does with its collectors: one that raises
loses its own families for that scrape, counts `errors_total{source=<concern>,
reason="exception"}` and reports `collector_success{collector=<concern>} 0`; the rest of
the scrape is served.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.attribution import Attributor, Snapshot
from exporter.engines import EngineCatalog
from exporter.errors import ErrorCounter
from exporter.nvml_source import GpuReading, NvmlSource
from exporter.proctable import ProcView
from exporter.supervisor import run_supervised

PREFIX = "gpu_residency_"
GPU_LABELS = ["node", "gpu", "uuid", "pci_bus_id", "model"]

# One concern's families, given the collection's snapshot.
FamilySource = Callable[[Snapshot], Iterable[Metric]]
CORE_CONCERNS = ("gpu", "processes")


class ResidencyCollector(Collector):
    def __init__(
        self,
        node: str,
        nvml: NvmlSource,
        catalog: EngineCatalog,
        errors: ErrorCounter,
        concerns: Iterable[tuple[str, FamilySource]] = (),
        min_interval: float = 0.0,
        disabled: Iterable[str] = (),
        observers: Iterable[Callable[[Snapshot], None]] = (),
    ) -> None:
        """`concerns`: (name, families) beyond the core GPU and process families; `disabled`:
        concern names not collected (--no-collector.NAME).

        `min_interval`: scrapes within this many seconds of the last collection reuse it, so
        many scrapers (HA Prometheus pairs, dashboards, gates) cost one NVML and /proc pass.
        `observers` see every new collection (the crash forensics' history)."""
        self._observers = list(observers)
        self._node = node
        self._nvml = nvml
        self._catalog = catalog
        self._errors = errors
        core = [("gpu", self._gpu_families), ("processes", self._attribution_families)]
        self._concerns = [(name, source) for name, source in [*core, *concerns] if name not in set(disabled)]
        self._min_interval = min_interval
        self.collections = 0  # how many real collections ran (for tests and benchmarks)
        self._attributor = Attributor(errors)
        self._lock = threading.Lock()
        self._last: tuple[float, Snapshot, float] | None = None  # (finished, snapshot, duration)

    def snapshot(self, max_age: float | None = None) -> tuple[Snapshot, float]:
        """A collection no older than `max_age` (default: the min interval), or one that
        finished while this call waited for a concurrent one: never a second pass at once."""
        asked = time.monotonic()
        oldest = asked - (self._min_interval if max_age is None else max_age)
        with self._lock:
            if self._last is not None and self._last[0] >= oldest:
                return self._last[1], self._last[2]
            started = time.perf_counter()
            reading = self._nvml.read()
            view = ProcView(self._errors)
            engines = self._catalog.resolve(view)
            snapshot = self._attributor.attribute(reading, engines, view)
            duration = time.perf_counter() - started
            self.collections += 1
            self._last = (time.monotonic(), snapshot, duration)
        for observer in self._observers:
            run_supervised("history", lambda observer=observer: observer(snapshot), self._errors)
        return snapshot, duration

    def collect(self) -> Iterable[Metric]:
        snapshot, duration = self.snapshot()
        outcomes = []
        for name, source in self._concerns:
            families: list[Metric] = []
            started = time.perf_counter()
            ok = run_supervised(name, lambda source=source, out=families: out.extend(source(snapshot)), self._errors)
            outcomes.append((name, ok, time.perf_counter() - started))
            if ok:
                yield from families
        yield from self._concern_families(outcomes)
        yield from self._self_families(snapshot, duration)

    def _concern_families(self, outcomes: list[tuple[str, bool, float]]) -> Iterable[Metric]:
        success = GaugeMetricFamily(
            PREFIX + "collector_success",
            "1 when the concern's families were collected this scrape; 0: it failed and its families are absent.",
            labels=["node", "collector"],
        )
        duration = GaugeMetricFamily(
            PREFIX + "collector_duration_seconds",
            "Time the concern's families took this scrape.",
            labels=["node", "collector"],
        )
        for name, ok, seconds in outcomes:
            success.add_metric([self._node, name], 1 if ok else 0)
            duration.add_metric([self._node, name], seconds)
        yield success
        yield duration

    def _gpu_labels(self, gpu: GpuReading) -> list[str]:
        return [self._node, str(gpu.index), gpu.uuid, gpu.pci_bus_id, gpu.model]

    def _gpu_families(self, snapshot: Snapshot) -> Iterable[Metric]:
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
                    family.add_metric(self._gpu_labels(gpu), value)
            yield family

    def _attribution_families(self, snapshot: Snapshot) -> Iterable[Metric]:
        node = self._node
        processes = GaugeMetricFamily(
            PREFIX + "process_memory_bytes",
            "GPU memory used by one process (NVML); engine is '' for a process in no known engine, holder names it "
            "anyway (its engine, Ray actor class, launcher or title; else its comm).",
            labels=["node", "gpu", "uuid", "pid", "comm", "engine", "container_id", "pod_uid", "holder", "holder_kind"],
        )
        for proc in snapshot.processes:
            if proc.used_bytes is not None:
                processes.add_metric(
                    [node, str(proc.gpu.index), proc.gpu.uuid, str(proc.pid), proc.comm, proc.engine, proc.container_id,
                     proc.pod_uid, proc.holder.name, proc.holder.kind],
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
            "GPU memory held by an engine's whole process tree on one GPU.",
            labels=["node", "engine", "gpu", "uuid"],
        )
        for usage in snapshot.engine_usage:
            if usage.used_bytes is not None:
                engine_memory.add_metric([node, usage.engine, str(usage.gpu.index), usage.gpu.uuid], usage.used_bytes)
        yield engine_memory
        unattributed = GaugeMetricFamily(
            PREFIX + "unattributed_memory_bytes",
            "GPU memory used minus the sum of all listed processes (high: PIDs not visible, e.g. no hostPID).",
            labels=["node", "gpu", "uuid"],
        )
        for gpu, value in snapshot.unattributed:
            unattributed.add_metric([node, str(gpu.index), gpu.uuid], value)
        yield unattributed
        engine_up = GaugeMetricFamily(
            PREFIX + "engine_up",
            "1 while the engine's root process lives (same PID and start time), else 0.",
            labels=["node", "engine", "kind"],
        )
        for engine in snapshot.engines:
            engine_up.add_metric([node, engine.name, engine.kind], 1 if engine.up else 0)
        yield engine_up

    def _self_families(self, snapshot: Snapshot, duration: float) -> Iterable[Metric]:
        node = self._node
        yield _node_gauge("nvml_up", "1 when NVML answered this collection.", node, 1 if snapshot.nvml.up else 0)
        yield _node_gauge("scrape_duration_seconds", "Time the last collection took.", node, duration)
        collections = CounterMetricFamily(
            PREFIX + "collections",
            "NVML and /proc passes; scrapes that reuse a recent one do not add.",
            labels=["node"],
        )
        collections.add_metric([node], self.collections)
        yield collections
        errors = CounterMetricFamily(
            PREFIX + "errors", "Failed reads, by source and reason.", labels=["node", "source", "reason"]
        )
        for (source, reason), count in sorted(self._errors.snapshot().items()):
            errors.add_metric([node, source, reason], count)
        yield errors
        build = GaugeMetricFamily(PREFIX + "build_info", "Exporter version.", labels=["node", "version"])
        build.add_metric([node, __version__], 1)
        yield build


def _node_gauge(name: str, doc: str, node: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, doc, labels=["node"])
    family.add_metric([node], value)
    return family
