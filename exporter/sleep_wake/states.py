"""An engine's state, whoever tells it: its framework or the engine itself.

- **framework**: the registry entry's `state` (exporter.registry.set_engine_state), written
  by the framework that called the engine's release or resume.
- **observed**: what the engine reports about itself, polled in the background (vLLM says
  whether it sleeps, and at which level; SGLang does not).

How the two combine, per engine:
- The engine's own report wins whenever there is one (its last poll succeeded and said):
  `source="observed"`; otherwise the framework's state: `source="framework"`; with neither
  the engine has no state.
- An observed state changed at the poll that first saw it. When the framework set that same
  state after the last poll that still saw the old one, the framework's time is used instead:
  it is the moment its call returned, more precise than a poll.
- A framework-set active or asleep that disagrees with the observed state for longer than
  `grace` (a poll lags behind the call) is a mismatch: the gauge says 1 while it lasts and
  the counter counts it once. Framework active, engine asleep: it was never woken, or the
  wake did not take ("woken but still asleep"). Framework asleep, engine active: the memory
  the framework believes free is held.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from exporter.engines.catalog import Engine
from exporter.snapshot.attribution import Snapshot

COMPARED = ("active", "asleep")  # the framework states an engine's own report can confirm or deny


@dataclass(frozen=True)
class Observed:
    """An engine's report of its own state."""

    state: str  # active | asleep
    level: int | None = None  # how deep the sleep is, where the engine says (vLLM: 0, 1, 2)
    since: float | None = None  # wall time of the poll that first saw it; None: so at the first look
    before: float | None = None  # wall time of the last poll that saw the previous state
    release_expected: bool = True  # False: a sleep that keeps the engine's memory (vLLM level 0)


@dataclass(frozen=True)
class EngineState:
    """The state the exporter goes by for one engine."""

    state: str  # starting | active | asleep | stopped
    since: float | None  # wall time of the change; None: unknown
    source: str  # framework | observed
    release_expected: bool = True  # an asleep engine is expected to fall under the release floor


class StateObserver(Protocol):
    changes: int  # grows whenever an engine's observed state changed

    def observed(self, engines: Iterable[Engine]) -> Mapping[str, Observed]:
        """The engines' own reports, by name, for the engines of this snapshot that gave one."""


@dataclass
class _Disagreement:
    framework: str
    observed: str
    first_seen: float
    counted: bool = False


class EngineStates:
    def __init__(self, node: str, observers: Iterable[StateObserver] = (), grace: float = 15.0) -> None:
        self._node = node
        self._observers = list(observers)
        self._grace = grace
        self._lock = threading.Lock()
        self._disagreements: dict[str, _Disagreement] = {}
        self._mismatches: dict[tuple[str, str, str], int] = {}  # (engine, framework, observed) -> count

    def changes(self) -> int:
        """A number that changes whenever an observed state did (the watcher looks again then)."""
        return sum(observer.changes for observer in self._observers)

    def current(self, snapshot: Snapshot, now: float) -> dict[str, EngineState]:
        """Each engine's state (engines with none are left out); records mismatches as of `now`."""
        observed: dict[str, Observed] = {}
        for observer in self._observers:
            observed.update(observer.observed(snapshot.engines))
        states = {}
        with self._lock:
            for engine in snapshot.engines:
                seen = observed.get(engine.name) if engine.up else None
                state = combine(engine, seen)
                if state is not None:
                    states[engine.name] = state
                self._compare(engine, seen, now)
            known = {engine.name for engine in snapshot.engines}
            for name in set(self._disagreements) - known:
                del self._disagreements[name]
            for key in [key for key in self._mismatches if key[0] not in known]:
                del self._mismatches[key]
        return states

    def _compare(self, engine: Engine, seen: Observed | None, now: float) -> None:
        if seen is None or engine.state not in COMPARED or engine.state == seen.state:
            self._disagreements.pop(engine.name, None)
            return
        current = self._disagreements.get(engine.name)
        if current is None or (current.framework, current.observed) != (engine.state, seen.state):
            current = self._disagreements[engine.name] = _Disagreement(engine.state, seen.state, now)
        if not current.counted and now - current.first_seen >= self._grace:
            current.counted = True
            key = (engine.name, engine.state, seen.state)
            self._mismatches[key] = self._mismatches.get(key, 0) + 1

    def families(self, snapshot: Snapshot, states: Mapping[str, EngineState], now: float) -> Iterable[Metric]:
        node = self._node
        gauge = GaugeMetricFamily(
            "gpu_residency_engine_state_mismatch",
            "For engines with a framework-set and an observed state: 1 while the two have disagreed for longer than "
            "the grace period (framework active, engine asleep: never woken, or the wake did not take; framework "
            "asleep, engine active: its memory is still held), else 0.",
            labels=["node", "engine", "framework", "observed"],
        )
        with self._lock:
            for engine in snapshot.engines:
                state = states.get(engine.name)
                if state is None or state.source != "observed" or engine.state not in COMPARED:
                    continue
                disagreement = self._disagreements.get(engine.name)
                lasting = disagreement is not None and now - disagreement.first_seen >= self._grace
                gauge.add_metric([node, engine.name, engine.state, state.state], 1 if lasting else 0)
            counts = sorted(self._mismatches.items())
        yield gauge
        counter = CounterMetricFamily(
            "gpu_residency_engine_state_mismatches",
            "Times an engine's framework-set state and its own report disagreed for longer than the grace period.",
            labels=["node", "engine", "framework", "observed"],
        )
        for (name, framework, observed), count in counts:
            counter.add_metric([node, name, framework, observed], count)
        yield counter


def combine(engine: Engine, seen: Observed | None) -> EngineState | None:
    """The state to go by: the engine's own report when it has one, else the framework's."""
    if seen is None:
        if engine.state is None:
            return None
        return EngineState(engine.state, engine.state_since, "framework")
    since = seen.since
    framework_since = engine.state_since
    if engine.state == seen.state and framework_since is not None:
        after_last_look = seen.before is None or framework_since >= seen.before
        if since is None or (after_last_look and framework_since <= since):
            since = framework_since  # the framework's call returned then; the poll saw it later
    return EngineState(seen.state, since, "observed", seen.release_expected)
