"""Sleep/wake awareness: engine state from the registry, release and wake latency, timeouts,
the gate's record of which engine it waits for."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import one, parse_metrics, scrape_until, values

from exporter.engines.catalog import Engine
from exporter.registry import RegistryError, engine_asleep, register_engine, set_engine_state
from exporter.sleep_wake.states import EngineStates, Observed, combine
from exporter.sleep_wake.transitions import TransitionTracker
from exporter.snapshot.attribution import EngineUsage, Snapshot
from exporter.sources.nvml import GpuReading, NvmlReading
from fakenvml import GIB
from gate import ResidualGate
from gate.readings import GpuSample, Holder


def _start(exporter_factory, scenario, registry, *extra):
    return exporter_factory(
        scenario, "--registry.dir", str(registry), "--no-engines.discover", "--engines.state-interval", "0.1", *extra
    )


def _hold(scenario, pid, gib):
    scenario.gpus[0].processes = [(pid, int(gib * GIB))]
    scenario.gpus[0].used = int(gib * GIB) + GIB // 4
    scenario.write()


def test_release_after_two_seconds_is_measured_as_about_two_seconds(exporter_factory, scenario, spawn_tree, tmp_path):
    registry = tmp_path / "reg"
    tree = spawn_tree()
    register_engine("rollout-0", root_pid=tree.pid, directory=registry, state="active")
    _hold(scenario, tree.leaves[0], 20)
    exporter = _start(exporter_factory, scenario, registry)
    assert one(exporter.scrape(), "gpu_residency_engine_state", engine="rollout-0", state="active") == 1

    set_engine_state("rollout-0", "asleep", registry)  # /release_memory_occupation returned 200...
    timer = threading.Timer(2.0, _hold, (scenario, tree.leaves[0], 1.5))  # ...the memory goes 2 s later
    timer.start()
    m = scrape_until(exporter, lambda m: values(m, "gpu_residency_engine_release_seconds_count", engine="rollout-0"))
    assert one(m, "gpu_residency_engine_state", engine="rollout-0", state="asleep") == 1
    released = one(m, "gpu_residency_engine_release_seconds_sum", engine="rollout-0")
    assert 1.9 <= released <= 2.6, released
    assert one(m, "gpu_residency_engine_release_seconds_bucket", engine="rollout-0", le="2.0") == 0
    assert one(m, "gpu_residency_engine_release_seconds_bucket", engine="rollout-0", le="5.0") == 1

    # Wake: marked active, residency back (>= 90% of the 20 GiB it held) 1 s later.
    set_engine_state("rollout-0", "active", registry)
    threading.Timer(1.0, _hold, (scenario, tree.leaves[0], 19)).start()
    m = scrape_until(exporter, lambda m: values(m, "gpu_residency_engine_wake_seconds_count", engine="rollout-0"))
    assert 0.9 <= one(m, "gpu_residency_engine_wake_seconds_sum", engine="rollout-0") <= 1.6


def test_a_release_that_never_happens_times_out_and_names_its_processes(
    exporter_factory, scenario, spawn_tree, tmp_path
):
    registry = tmp_path / "reg"
    tree = spawn_tree(title="sglang::scheduler_TP{rank}")
    register_engine("stuck", root_pid=tree.pid, directory=registry, state="active")
    _hold(scenario, tree.leaves[0], 30)
    exporter = _start(exporter_factory, scenario, registry, "--engines.release-timeout", "1")
    exporter.scrape()
    with engine_asleep("stuck", registry):
        m = scrape_until(
            exporter, lambda m: values(m, "gpu_residency_engine_release_timeouts_total", engine="stuck") == [1]
        )
        assert one(m, "gpu_residency_engine_release_timeouts_total", engine="stuck") == 1
        assert values(m, "gpu_residency_engine_release_seconds_count", engine="stuck") == []
    log = exporter.log()
    assert "engine stuck: release not complete" in log
    assert f"pid {tree.leaves[0]} sglang::scheduler_TP0" in log and "30.0 GiB on GPU 0" in log
    scrape_until(exporter, lambda m: values(m, "gpu_residency_engine_state", engine="stuck", state="active") == [1])


def test_state_survives_an_exporter_restart(exporter_factory, scenario, spawn_tree, tmp_path):
    registry = tmp_path / "reg"
    tree = spawn_tree()
    register_engine("e", root_pid=tree.pid, directory=registry, state="starting")
    set_engine_state("e", "asleep", registry)
    first = _start(exporter_factory, scenario, registry)
    changed = one(first.scrape(), "gpu_residency_engine_state_change_timestamp_seconds", engine="e")
    first.stop()
    second = _start(exporter_factory, scenario, registry)
    m = second.scrape()
    assert one(m, "gpu_residency_engine_state", engine="e", state="asleep") == 1
    assert sum(values(m, "gpu_residency_engine_state", engine="e")) == 1
    assert one(m, "gpu_residency_engine_state_change_timestamp_seconds", engine="e") == changed


def test_engines_without_a_state_publish_none(local_exporter, spawn_tree):
    tree = spawn_tree()
    register_engine("plain", root_pid=tree.pid, directory=local_exporter.registry_dir)
    m = local_exporter.scrape()
    assert values(m, "gpu_residency_engine_state", engine="plain") == []
    assert values(m, "gpu_residency_engine_release_timeouts_total", engine="plain") == []


def test_set_state_errors_are_clear(tmp_path):
    with pytest.raises(RegistryError, match="not registered"):
        set_engine_state("ghost", "asleep", tmp_path)
    register_engine("e", directory=tmp_path)
    with pytest.raises(RegistryError, match="must be one of"):
        set_engine_state("e", "dozing", tmp_path)


def test_gate_names_the_engine_it_waits_for():
    holders = (
        Holder("engine", "rollout-3", int(9.4 * GIB)),
        Holder("process", "sglang::scheduler_TP0", int(9.4 * GIB), engine="rollout-3", pid=4121, role="sglang"),
        Holder("unattributed", "", GIB // 10),
    )
    sample = GpuSample(3, "GPU-3", "00000000:48:00.0", int(9.6 * GIB), None, holders)

    class Source:
        name = "fixed"

        def read(self, node):
            return [sample]

    decision = ResidualGate(2, source=Source()).check([3], waiting_for="rollout-3")
    text = decision.explain()
    assert (
        "waiting for engine rollout-3's release: rollout-3 still holds 9.4 GiB on GPU 3 "
        "(pid 4121 sglang::scheduler_TP0)" in text
    )
    assert "top holders: engine rollout-3: 9.4 GiB, unattributed: 0.1 GiB" in text


def test_gate_decisions_reach_the_exporter_for_the_engine_they_guard(local_exporter, spawn_tree, scenario):
    registry = local_exporter.registry_dir
    tree = spawn_tree()
    register_engine("rollout-1", root_pid=tree.pid, directory=registry, state="asleep")
    scenario.gpus[0].used = 10 * GIB
    scenario.write()

    class Nvml:
        name = "fixed"

        def read(self, node):
            return [GpuSample(0, "GPU-0", "", 10 * GIB)]

    gate = ResidualGate(2, source=Nvml(), record_dir=registry)
    assert not gate.check([0], wake="rollout-1").ok
    m = local_exporter.scrape()
    assert one(m, "gpu_residency_gate_clear", engine="rollout-1") == 0
    assert time.time() - one(m, "gpu_residency_gate_decision_timestamp_seconds", engine="rollout-1") < 60
    assert values(m, "gpu_residency_gate_clear", engine="other") == []


# ---------- states the engine reports itself (vLLM), and how they combine with the framework's ----------

GPU0 = GpuReading(0, "GPU-0", "", "fake", 0, 80 * GIB, 0, ())


class Reports:
    """A stand-in for the vLLM poller: the engines' own reports, set by the test."""

    def __init__(self) -> None:
        self.changes = 0
        self.now: dict[str, Observed] = {}

    def set(self, name: str, observed: Observed | None) -> None:
        self.changes += 1
        if observed is None:
            self.now.pop(name, None)
        else:
            self.now[name] = observed

    def observed(self, engines):
        return dict(self.now)


def vllm_engine(name="v", state=None, since=None) -> Engine:
    return Engine(name, "vllm", "http://127.0.0.1:8000", "discovered", 10, 1, True, state=state, state_since=since)


def held(engine: Engine, gib: float) -> Snapshot:
    usage = (EngineUsage(engine.name, GPU0, int(gib * GIB)),)
    return Snapshot(NvmlReading(True, (GPU0,)), (engine,), (), usage, ())


def tracker_with(reports: Reports, grace: float = 15.0) -> TransitionTracker:
    states = EngineStates("n", observers=[reports], grace=grace)
    return TransitionTracker("n", 2 * GIB, release_limit=60, wake_limit=300, states=states)


def scraped(tracker: TransitionTracker, snapshot: Snapshot) -> dict:
    from prometheus_client import CollectorRegistry, generate_latest

    class One:
        def collect(self):
            return tracker.families(snapshot)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())
    return parse_metrics(generate_latest(registry).decode())


def test_an_observed_sleep_is_timed_from_the_poll_that_saw_it_with_no_framework_call():
    reports, t0 = Reports(), time.time()
    tracker = tracker_with(reports)
    e = vllm_engine()
    reports.set("v", Observed("active"))  # the first look: awake since before we knew
    tracker.observe(held(e, 20), now=t0)
    assert not tracker.pending()
    reports.set("v", Observed("asleep", level=1, since=t0 + 1, before=t0 + 0.5))
    tracker.observe(held(e, 20), now=t0 + 1.1)
    assert tracker.pending()
    tracker.observe(held(e, 1), now=t0 + 3)
    m = scraped(tracker, held(e, 1))
    assert one(m, "gpu_residency_engine_release_seconds_sum", engine="v") == pytest.approx(2.0)
    assert one(m, "gpu_residency_engine_state", engine="v", state="asleep", source="observed") == 1
    assert one(m, "gpu_residency_engine_state_change_timestamp_seconds", engine="v") == t0 + 1
    assert values(m, "gpu_residency_engine_state_mismatch") == [], "no framework state: nothing to compare"


def test_the_framework_mark_between_two_polls_is_the_better_start():
    reports, t0 = Reports(), time.time()
    tracker = tracker_with(reports)
    reports.set("v", Observed("active"))
    tracker.observe(held(vllm_engine(state="active", since=t0 - 10), 20), now=t0)
    # /sleep returned and the framework marked it at t0+0.4; the poll saw it at t0+0.9 (the one before, t0+0.2).
    marked = vllm_engine(state="asleep", since=t0 + 0.4)
    reports.set("v", Observed("asleep", level=2, since=t0 + 0.9, before=t0 + 0.2))
    tracker.observe(held(marked, 20), now=t0 + 1)
    tracker.observe(held(marked, 1), now=t0 + 2.4)
    m = scraped(tracker, held(marked, 1))
    assert one(m, "gpu_residency_engine_release_seconds_sum", engine="v") == pytest.approx(2.0)
    assert one(m, "gpu_residency_engine_state_change_timestamp_seconds", engine="v") == t0 + 0.4
    # A mark from before the last poll that still saw it awake is not this change: the poll's time stands.
    stale = combine(vllm_engine(state="asleep", since=t0 + 0.1), reports.now["v"])
    assert stale.since == t0 + 0.9 and stale.source == "observed"


def test_a_lost_report_neither_restarts_nor_drops_an_open_release():
    reports, t0 = Reports(), time.time()
    tracker = tracker_with(reports)
    reports.set("v", Observed("active"))
    tracker.observe(held(vllm_engine(state="active", since=t0 - 10), 20), now=t0)
    reports.set("v", Observed("asleep", level=1, since=t0 + 1, before=t0))
    marked_late = vllm_engine(state="asleep", since=t0 + 5)  # the framework marked it after the poll saw it
    tracker.observe(held(marked_late, 20), now=t0 + 1.5)
    reports.set("v", None)  # the poll fails: the framework's asleep (since t0+5) stands in
    tracker.observe(held(marked_late, 20), now=t0 + 6)
    assert tracker.pending(), "the same state from the other source does not restart the timing"
    tracker.observe(held(marked_late, 1), now=t0 + 7)
    m = scraped(tracker, held(marked_late, 1))
    assert one(m, "gpu_residency_engine_release_seconds_sum", engine="v") == pytest.approx(6.0)
    assert one(m, "gpu_residency_engine_state", engine="v", state="asleep", source="framework") == 1

    # With no framework state, a lost report leaves the timing open and undecided.
    reports = Reports()
    tracker = tracker_with(reports)
    e = vllm_engine()
    reports.set("v", Observed("active"))
    tracker.observe(held(e, 20), now=t0)
    reports.set("v", Observed("asleep", level=1, since=t0 + 1, before=t0))
    tracker.observe(held(e, 20), now=t0 + 1)
    reports.set("v", None)
    tracker.observe(held(e, 20), now=t0 + 100)  # past the limit, but the state is unknown: no timeout
    reports.set("v", Observed("asleep", level=1, since=t0 + 1, before=t0))
    tracker.observe(held(e, 1), now=t0 + 101)
    m = scraped(tracker, held(e, 1))
    assert one(m, "gpu_residency_engine_release_seconds_sum", engine="v") == pytest.approx(100.0)
    assert one(m, "gpu_residency_engine_release_timeouts_total", engine="v") == 0


def test_a_level_0_sleep_keeps_its_memory_and_is_not_timed():
    reports, t0 = Reports(), time.time()
    tracker = tracker_with(reports)
    tracker._limits["release"] = 1
    e = vllm_engine()
    reports.set("v", Observed("active"))
    tracker.observe(held(e, 20), now=t0)
    reports.set("v", Observed("asleep", level=0, since=t0 + 1, before=t0, release_expected=False))
    tracker.observe(held(e, 20), now=t0 + 1)
    tracker.observe(held(e, 20), now=t0 + 30)
    assert not tracker.pending()
    reports.set("v", Observed("active", since=t0 + 40, before=t0 + 39))
    tracker.observe(held(e, 20), now=t0 + 40)
    m = scraped(tracker, held(e, 20))
    for family in ("release_seconds_count", "wake_seconds_count"):
        assert values(m, f"gpu_residency_engine_{family}", engine="v") == [], family
    assert one(m, "gpu_residency_engine_release_timeouts_total", engine="v") == 0


def test_a_framework_state_the_engine_contradicts_is_a_mismatch_after_the_grace():
    reports, t0 = Reports(), time.time()
    tracker = tracker_with(reports, grace=10)
    woken = vllm_engine(state="active", since=t0)  # the framework says it woke the engine...
    reports.set("v", Observed("asleep", level=1))  # ...the engine says it sleeps
    tracker.observe(held(woken, 1), now=t0 + 1)
    m = scraped(tracker, held(woken, 1))
    assert one(m, "gpu_residency_engine_state_mismatch", engine="v", framework="active", observed="asleep") == 0
    assert one(m, "gpu_residency_engine_state", engine="v", state="asleep", source="observed") == 1
    tracker.observe(held(woken, 1), now=t0 + 12)
    tracker.observe(held(woken, 1), now=t0 + 20)
    states = tracker.states
    counts = list(states.families(held(woken, 1), states.current(held(woken, 1), t0 + 20), t0 + 20))
    gauge, counter = ({tuple(s.labels.values()): s.value for s in family.samples} for family in counts)
    assert gauge[("n", "v", "active", "asleep")] == 1
    assert counter[("n", "v", "active", "asleep")] == 1, "one mismatch, counted once"
    reports.set("v", Observed("active", since=t0 + 21, before=t0 + 20))  # the wake finally took
    tracker.observe(held(woken, 20), now=t0 + 21)
    gauge, counter = (
        {tuple(s.labels.values()): s.value for s in family.samples}
        for family in states.families(held(woken, 20), states.current(held(woken, 20), t0 + 21), t0 + 21)
    )
    assert gauge == {("n", "v", "active", "active"): 0} and counter[("n", "v", "active", "asleep")] == 1
