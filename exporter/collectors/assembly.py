"""The prometheus_client Collector: one fresh set of families per scrape.

Building the families per scrape (no long-lived labelled Gauges) means a process or
engine that disappears leaves no stale series. Every scrape reads the shared snapshot
(exporter.snapshot.shared): concurrent scrapes, the JSON API and the background watchers
share one collection instead of hitting NVML and /proc again.

Each concern (GPU memory, processes, SGLang accounting, exits, sleep/wake, gate records)
is collected in isolation, as node_exporter does with its collectors: one that raises
loses its own families for that scrape, counts `errors_total{source=<concern>,
reason="exception"}` and reports `collector_success{collector=<concern>} 0`; the rest of
the scrape is served.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from functools import partial

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.collectors.gpu import gpu_families
from exporter.collectors.names import PREFIX
from exporter.collectors.processes import process_families
from exporter.engines.catalog import EngineCatalog
from exporter.errors import ErrorCounter
from exporter.snapshot.attribution import Snapshot
from exporter.snapshot.shared import SharedSnapshot
from exporter.sources.nvml import NvmlSource
from exporter.supervisor import run_supervised

# One concern's families, given the collection's snapshot.
FamilySource = Callable[[Snapshot], Iterable[Metric]]


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
        self._node = node
        self._errors = errors
        core = [("gpu", partial(gpu_families, node)), ("processes", partial(process_families, node))]
        self._concerns = [(name, source) for name, source in [*core, *concerns] if name not in set(disabled)]
        self.shared = SharedSnapshot(nvml, catalog, errors, min_interval, observers)

    def snapshot(self, max_age: float | None = None) -> tuple[Snapshot, float]:
        """The shared snapshot (exporter.snapshot.shared): what every other consumer reads too."""
        return self.shared.snapshot(max_age)

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

    def _self_families(self, snapshot: Snapshot, duration: float) -> Iterable[Metric]:
        node = self._node
        yield _node_gauge("nvml_up", "1 when NVML answered this collection.", node, 1 if snapshot.nvml.up else 0)
        yield _node_gauge("scrape_duration_seconds", "Time the last collection took.", node, duration)
        collections = CounterMetricFamily(
            PREFIX + "collections",
            "NVML and /proc passes; scrapes that reuse a recent one do not add.",
            labels=["node"],
        )
        collections.add_metric([node], self.shared.collections)
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
