"""Sleep/wake awareness: engine state from the registry, release and wake latency, timeouts,
the gate's record of which engine it waits for."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import one, values

from exporter.registry import RegistryError, engine_asleep, register_engine, set_engine_state
from fakenvml import GIB
from gate import ResidualGate
from gate.readings import GpuSample, Holder


def _start(exporter_factory, scenario, registry, *extra):
    return exporter_factory(
        scenario, "--registry.dir", str(registry), "--no-engines.discover", "--engines.state-interval", "0.1", *extra
    )


def _until(exporter, predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = exporter.scrape()
        if predicate(metrics):
            return metrics
        time.sleep(0.1)
    raise AssertionError(f"condition not met in {timeout}s")


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
    m = _until(exporter, lambda m: values(m, "gpu_residency_engine_release_seconds_count", engine="rollout-0"))
    assert one(m, "gpu_residency_engine_state", engine="rollout-0", state="asleep") == 1
    released = one(m, "gpu_residency_engine_release_seconds_sum", engine="rollout-0")
    assert 1.9 <= released <= 2.6, released
    assert one(m, "gpu_residency_engine_release_seconds_bucket", engine="rollout-0", le="2.0") == 0
    assert one(m, "gpu_residency_engine_release_seconds_bucket", engine="rollout-0", le="5.0") == 1

    # Wake: marked active, residency back (>= 90% of the 20 GiB it held) 1 s later.
    set_engine_state("rollout-0", "active", registry)
    threading.Timer(1.0, _hold, (scenario, tree.leaves[0], 19)).start()
    m = _until(exporter, lambda m: values(m, "gpu_residency_engine_wake_seconds_count", engine="rollout-0"))
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
        m = _until(exporter, lambda m: values(m, "gpu_residency_engine_release_timeouts_total", engine="stuck"))
        assert one(m, "gpu_residency_engine_release_timeouts_total", engine="stuck") == 1
        assert values(m, "gpu_residency_engine_release_seconds_count", engine="stuck") == []
    log = exporter.log()
    assert "engine stuck: release not complete" in log
    assert f"pid {tree.leaves[0]} sglang::scheduler_TP0" in log and "30.0 GiB on GPU 0" in log
    _until(exporter, lambda m: values(m, "gpu_residency_engine_state", engine="stuck", state="active") == [1])


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
    assert values(local_exporter.scrape(), "gpu_residency_engine_state", engine="plain") == []


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
