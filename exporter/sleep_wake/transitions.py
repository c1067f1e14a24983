"""Sleep and wake, measured: after an engine goes asleep, how long until its memory is
really gone; after it goes active, how long until its memory is back.

SGLang answers /release_memory_occupation with 200 whether or not the memory went (one
public report: ~30 GiB stayed resident with the memory saver off); vLLM's /sleep flips its
state even when sleep mode is off and nothing is freed. The state comes from
`exporter.sleep_wake.states.EngineStates`: the framework's mark
(exporter.registry.set_engine_state) or the engine's own report (vLLM), whichever it has;
this module watches residency from the moment of the change:

- release: done when the engine holds under `floor` on every GPU; else, after `limit`,
  a timeout is counted and the holders are logged;
- wake: done when it holds again, on every GPU it held before sleeping, at least 90% of
  what it held then (or, never seen awake, more than `floor` somewhere).

A sleep that is not expected to free memory (vLLM level 0 keeps the weights) is not timed,
nor the wake that follows it. Only transitions that began while this exporter ran are timed:
one that began before a restart has an unknown start as far as the measurement goes. A state
that is unknown for a while (the engine's poll failed, no framework state to fall back on)
leaves a timing open, undecided; the same state from the other source does not restart it. Nothing is decided while the
exporter is blind (NVML down, a GPU or its process list unreadable): an engine that shows
no memory then may hold plenty. An engine that leaves the catalog takes its histograms and
counters with it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from exporter.engines.registry import STATES
from exporter.sleep_wake.states import EngineState, EngineStates
from exporter.snapshot.attribution import Snapshot

log = logging.getLogger(__name__)

# Eight bounds (were eleven: the histograms were 40% of a node's series): sub-second to 10 s
# where releases and wakes usually fall, 30 s for GpuEngineReleaseSlow's "slower than 30 s"
# bucket ratio, 60 s and 300 s for the default release and wake timeouts.
BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
WAKE_FRACTION = 0.9
START_SLACK_SECONDS = 2.0  # a change written just before start-up still counts as seen


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: int = 0
    sum: float = 0.0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[index] += 1
        self.total += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        return [(str(bound), count) for bound, count in zip(BUCKETS, self.counts, strict=True)] + [("+Inf", self.total)]


@dataclass
class _Open:
    kind: str  # release | wake
    since: float
    target: dict[str, int]  # wake: per-GPU bytes to get back to


class TransitionTracker:
    def __init__(
        self,
        node: str,
        floor_bytes: int,
        release_limit: float,
        wake_limit: float,
        states: EngineStates | None = None,
        on_release: Callable[[str, dict[str, int], Snapshot, float], None] | None = None,
    ) -> None:
        """`states`: where each engine's state comes from (default: the framework's mark only);
        `on_release(engine, held, snapshot, since)`: told what each completed release (asleep since
        `since`) left behind: the cycle history."""
        self._node = node
        self._floor = floor_bytes
        self._limits = {"release": release_limit, "wake": wake_limit}
        self.states = states or EngineStates(node)
        self._on_release = on_release
        self._started = time.time()
        self._seen: dict[str, EngineState] = {}  # engine -> the state last handled
        self._kept: set[str] = set()  # engines asleep without releasing: their wake is not timed
        self._open: dict[str, _Open] = {}
        self._awake_level: dict[str, dict[str, int]] = {}  # engine -> per-GPU bytes while active
        self._histograms = {"release": {}, "wake": {}}
        self._timeouts = {"release": {}, "wake": {}}
        self._lock = threading.Lock()  # scrapes and the watcher thread both observe

    def pending(self) -> bool:
        """A transition is being timed: worth looking more often than scrapes do."""
        return bool(self._open)

    def observe(self, snapshot: Snapshot, now: float | None = None) -> None:
        with self._lock:
            self._observe(snapshot, time.time() if now is None else now)

    def _observe(self, snapshot: Snapshot, now: float) -> None:
        self._forget_gone({engine.name for engine in snapshot.engines})
        states = self.states.current(snapshot, now)
        if not snapshot.complete:
            return  # blind: "holds nothing" cannot be told from "cannot see"
        usage: dict[str, dict[str, int | None]] = {}
        for item in snapshot.engine_usage:
            usage.setdefault(item.engine, {})[item.gpu.uuid] = item.used_bytes
        live = set()
        for engine in snapshot.engines:
            if not engine.up:
                continue
            state = states.get(engine.name)
            if state is None:
                if engine.name in self._open:
                    live.add(engine.name)  # its state is unknown for now: keep the timing, decide nothing
                continue
            live.add(engine.name)
            held = usage.get(engine.name, {})
            if None in held.values():
                continue  # a process's memory is unknown this time: decide nothing
            self._update(engine.name, state)
            if state.state == "active" and engine.name not in self._open:
                self._awake_level[engine.name] = dict(held)
            self._check(engine.name, held, now, snapshot, state)
        for gone in set(self._open) - live:
            del self._open[gone]

    def _forget_gone(self, known: set[str]) -> None:
        tables = (self._seen, self._open, self._awake_level, *self._histograms.values(), *self._timeouts.values())
        for table in tables:
            for name in set(table) - known:
                del table[name]
        self._kept &= known

    def _update(self, name: str, state: EngineState) -> None:
        """A new state begins a timing. The same state from the other source (an engine whose poll
        failed falls back to its framework's mark, and back) only takes note; an observed state's
        start moving (the framework's mark refining the poll's time) re-times the open transition.
        The framework marking the same state again begins anew."""
        last = self._seen.get(name)
        self._seen[name] = state
        if last is not None and last.state == state.state:
            if last.source != state.source or last.since == state.since:
                return
            if state.source == "observed":
                opened = self._open.get(name)
                if opened is not None and state.since is not None:
                    opened.since = state.since
                return
        self._begin(name, state)

    def _begin(self, name: str, state: EngineState) -> None:
        self._open.pop(name, None)
        kept = name in self._kept
        self._kept.discard(name)
        if state.state == "asleep" and not state.release_expected:
            self._kept.add(name)  # a sleep that keeps the memory: nothing to time, now or at the wake
            return
        since = state.since
        if since is None or since < self._started - START_SLACK_SECONDS:
            return
        if state.state == "asleep":
            self._open[name] = _Open("release", since, {})
        elif state.state == "active" and name in self._awake_level and not kept:
            self._open[name] = _Open("wake", since, dict(self._awake_level[name]))

    def _check(self, name: str, held: dict[str, int], now: float, snapshot: Snapshot, state: EngineState) -> None:
        transition = self._open.get(name)
        if transition is None:
            return
        if transition.kind == "release":
            done = all(value < self._floor for value in held.values())
        elif transition.target:
            done = all(held.get(gpu, 0) >= WAKE_FRACTION * level for gpu, level in transition.target.items())
        else:
            done = any(value >= self._floor for value in held.values())
        elapsed = max(0.0, now - transition.since)
        if done:
            self._histograms[transition.kind].setdefault(name, _Histogram()).observe(elapsed)
            del self._open[name]
            if transition.kind == "release" and self._on_release is not None:
                self._on_release(name, held, snapshot, transition.since)
        elif elapsed > self._limits[transition.kind]:
            counts = self._timeouts[transition.kind]
            counts[name] = counts.get(name, 0) + 1
            holders = ", ".join(
                f"pid {p.pid} {p.comm} {p.used_bytes / 1024**3:.1f} GiB on GPU {p.gpu.index}"
                for p in snapshot.processes
                if p.engine == name and p.used_bytes
            )
            told = "reported by the engine" if state.source == "observed" else "set by its framework"
            log.warning(
                "engine %s: %s not complete after %.0fs (state %s since %.3f); holders: %s",
                name,
                transition.kind,
                elapsed,
                told,
                transition.since,
                holders or "none",
            )
            del self._open[name]

    def families(self, snapshot: Snapshot) -> Iterable[Metric]:
        now = time.time()
        self.observe(snapshot, now)
        node = self._node
        states = self.states.current(snapshot, now)
        state = GaugeMetricFamily(
            "gpu_residency_engine_state",
            "1 for the engine's current state (starting, active, asleep, stopped); source: observed when the engine "
            "reports it itself (vLLM), else framework (the state its framework set).",
            labels=["node", "engine", "state", "source"],
        )
        since = GaugeMetricFamily(
            "gpu_residency_engine_state_change_timestamp_seconds",
            "When the engine's state last changed (Unix time): the framework's mark, or the poll that saw the "
            "engine's own report change.",
            labels=["node", "engine"],
        )
        for engine in snapshot.engines:
            current = states.get(engine.name)
            if current is None:
                continue
            for name in STATES:
                state.add_metric([node, engine.name, name, current.source], 1 if name == current.state else 0)
            if current.since is not None:
                since.add_metric([node, engine.name], current.since)
        yield state
        yield since
        yield from self.states.families(snapshot, states, now)
        with self._lock:
            histograms = {
                kind: [(name, h.buckets(), h.sum) for name, h in sorted(data.items())]
                for kind, data in self._histograms.items()
            }
            timeouts_by_kind = {kind: sorted(data.items()) for kind, data in self._timeouts.items()}
        for kind, doc in (
            ("release", "Seconds from an engine marked asleep until it held under the floor on every GPU."),
            ("wake", "Seconds from an engine marked active until its residency was back (resume cost)."),
        ):
            histogram = HistogramMetricFamily(f"gpu_residency_engine_{kind}_seconds", doc, labels=["node", "engine"])
            for name, buckets, total in histograms[kind]:
                histogram.add_metric([node, name], buckets, total)
            yield histogram
            timeouts = CounterMetricFamily(
                f"gpu_residency_engine_{kind}_timeouts",
                f"Engine {kind}s that did not complete within the limit (0 for every engine with a state, so that "
                "increase() sees an engine's first timeout).",
                labels=["node", "engine"],
            )
            counts = dict(timeouts_by_kind[kind])
            for name in sorted(set(counts) | set(states)):
                timeouts.add_metric([node, name], counts.get(name, 0))
            yield timeouts
