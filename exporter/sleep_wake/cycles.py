"""Residual creep: what each release leaves behind, cycle after cycle.

A cycle is one completed release: the engine went asleep (its framework's mark, or its own
report: vLLM) and the transition tracker saw its process tree fall under the release floor on
every GPU. The residual is what the tree still holds on each GPU at that moment, from NVML's
per-process figures (the same sum as gpu_residency_engine_memory_bytes). A trainer registered
as an engine counts alike: its offload is its sleep. Releases that time out are no cycle: their
residual is whatever was still being freed, not what the release leaves.

The growth per cycle is the least-squares slope of the residual against the cycle number over
the last N cycles (--engines.residual-window): it is per cycle, not per second, so it does not
depend on how fast the cycles come, and it is published only once N cycles are in (unknown until
then). Noise bounded by +-a moves that slope by at most a * sum|x - mean| / sum (x - mean)^2:
0.3 a at N = 10, 0.6 a at N = 5 (a = 50 MiB: 15 and 30 MiB a cycle), which is why N is at least 5
and GpuEngineResidualCreeping's threshold (32 MiB a cycle) sits above it.

The history lives in the state directory (cycle_state), so an exporter restart keeps it; it is
kept for at most MAX_ENGINES engines (the ones whose last release is oldest go first), and
published only for engines the catalog knows now.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from exporter.errors import ErrorCounter
from exporter.sleep_wake import cycle_state
from exporter.sleep_wake.cycle_state import EngineCycles, GpuResiduals
from exporter.snapshot.attribution import Snapshot

log = logging.getLogger(__name__)

MAX_ENGINES = 1024
MIN_WINDOW = 5
MAX_WINDOW = 100


def growth_per_cycle(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of bytes against cycle number (at least two distinct cycles)."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


class CycleHistory:
    def __init__(self, node: str, floor_bytes: int, window: int, state_dir: Path | None, errors: ErrorCounter) -> None:
        """`window`: the N cycles the growth is over; `state_dir`: where the history survives restarts."""
        self._node = node
        self._floor = floor_bytes
        self._window = window
        self._state_dir = state_dir
        self._errors = errors
        self._history = cycle_state.load(state_dir, window, errors)
        self._lock = threading.Lock()

    def record(self, engine: str, held: dict[str, int], snapshot: Snapshot, since: float) -> None:
        """A release of `engine`, asleep since `since`, completed leaving `held` (GPU uuid -> bytes of its
        tree). One already counted (an exporter restarted just after it times it again) is not counted twice."""
        index = {usage.gpu.uuid: usage.gpu.index for usage in snapshot.engine_usage}
        with self._lock:
            cycles = self._history.get(engine)
            if cycles is not None and since <= cycles.since:
                return
            if cycles is None:
                cycles = self._history[engine] = EngineCycles()
            cycles.count += 1
            cycles.since = since
            for uuid, used in held.items():  # `held` comes from the snapshot's engine usage: every GPU is in it
                gpu = cycles.gpus.setdefault(uuid, GpuResiduals(index[uuid]))
                gpu.index = index[uuid]
                gpu.points = [*gpu.points, (cycles.count, used)][-self._window :]
            self._evict()  # after the update: the engine just recorded is the newest
            self._save()

    def _evict(self) -> None:
        while len(self._history) > MAX_ENGINES:
            oldest = min(self._history, key=lambda name: self._history[name].since)
            del self._history[oldest]

    def _save(self) -> None:
        if self._state_dir is None:
            return
        try:
            cycle_state.save(self._state_dir, self._history)
        except OSError as exc:
            self._errors.inc("cycles_state", "unwritable")
            log.warning(
                "cannot save the release cycle history in %s: %s (it survives no restart)", self._state_dir, exc
            )
            self._state_dir = None  # said once; the history goes on in memory

    def growth(self, engine: str, uuid: str) -> float | None:
        """The engine's growth per cycle on that GPU, as published; None until N cycles are in."""
        with self._lock:
            cycles = self._history.get(engine)
            gpu = cycles.gpus.get(uuid) if cycles else None
            current = gpu is not None and len(gpu.points) >= self._window and gpu.points[-1][0] == cycles.count
            return growth_per_cycle(gpu.points) if current else None

    def families(self, snapshot: Snapshot) -> Iterable[Metric]:
        node = self._node
        known = {engine.name for engine in snapshot.engines}
        with self._lock:
            rows = [(name, c.count, dict(c.gpus)) for name, c in sorted(self._history.items()) if name in known]
        count = CounterMetricFamily(
            "gpu_residency_engine_release_cycles",
            "Releases of the engine that completed (its tree fell under the release floor on every GPU): its "
            "sleep/wake cycles, kept across exporter restarts.",
            labels=["node", "engine"],
        )
        residual = GaugeMetricFamily(
            "gpu_residency_engine_release_residual_bytes",
            "What the engine's process tree still held on the GPU when its latest release completed.",
            labels=["node", "engine", "gpu", "uuid"],
        )
        growth = GaugeMetricFamily(
            "gpu_residency_engine_release_residual_growth_bytes_per_cycle",
            f"Least-squares growth of the post-release residual per cycle over the last {self._window} cycles "
            "(absent until that many are in).",
            labels=["node", "engine", "gpu", "uuid"],
        )
        for name, cycles, gpus in rows:
            count.add_metric([node, name], cycles)
            for uuid, gpu in sorted(gpus.items()):
                if not gpu.points or gpu.points[-1][0] != cycles:
                    continue  # its tree held nothing there at the latest release: no residual to trend
                labels = [node, name, str(gpu.index), uuid]
                residual.add_metric(labels, gpu.points[-1][1])
                trend = self.growth(name, uuid)
                if trend is not None:
                    growth.add_metric(labels, trend)
        floor = GaugeMetricFamily(
            "gpu_residency_engine_release_floor_bytes",
            "The release floor (--engines.release-floor-gb): an asleep engine counts as released under it.",
            labels=["node"],
        )
        floor.add_metric([node], self._floor)
        yield from (count, residual, growth, floor)
