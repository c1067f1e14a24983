"""The gate: unit behaviour, the CLI, and end to end against a real Prometheus and the NVML source."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, visible_devices

import fakenvml
from fakenvml import GIB, GPU_IS_LOST
from gate import GateConfigError, GateTimeout, ResidualGate, probe_max_used_gpu_mem_gb, wait_for_residual
from gate.nvml_source import NvmlSource
from gate.prometheus_source import build_query, escape_label_value
from gate.readings import GpuSample, Holder


class FixedSource:
    name = "fixed"

    def __init__(self, samples):
        self.samples = samples

    def read(self, node):
        return list(self.samples)


def sample(index=0, used_gb=1.0, age=None, holders=()):
    return GpuSample(index, f"GPU-{index:04d}", f"00000000:{0x18 + index:02X}:00.0", int(used_gb * GIB), age, holders)


def test_import_gate_pulls_in_nothing_heavy():
    code = (
        "import sys, gate; heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('prometheus_client', 'pynvml', 'exporter', 'psutil', 'requests')]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_threshold_from_env_project_variable_first(monkeypatch):
    monkeypatch.setenv("MILES_MAX_RESIDUAL_GPU_MEM_GB", "7")
    assert ResidualGate.from_env(source=FixedSource([])).threshold_bytes == 7 * GIB
    monkeypatch.setenv("GPU_RESIDENCY_GATE_THRESHOLD_GB", "1.5")
    assert ResidualGate.from_env(source=FixedSource([])).threshold_bytes == int(1.5 * GIB)
    assert ResidualGate.from_env(source=FixedSource([]), threshold_gb=3).threshold_bytes == 3 * GIB


@pytest.mark.parametrize("value, message", [("abc", "must be a number"), ("0", "must be > 0"), ("-2", "must be > 0"),
                                            ("nan", "must be a number")])  # fmt: skip
def test_invalid_thresholds_fail_at_construction(monkeypatch, value, message):
    monkeypatch.setenv("MILES_MAX_RESIDUAL_GPU_MEM_GB", value)
    with pytest.raises(GateConfigError, match=message):
        ResidualGate.from_env(source=FixedSource([]))


def test_gpus_by_index_uuid_and_bus_id_and_the_explanation():
    holders = (Holder("engine", "rollout-3", int(9.4 * GIB)), Holder("unattributed", "", GIB))
    gate = ResidualGate(2, source=FixedSource([sample(0, 0.5), sample(3, 10.4, holders=holders)]))
    assert gate.check([0]).ok and gate.check(["GPU-0000"]).ok and gate.check(["00000000:18:00.0"]).ok
    assert gate.check(["0000:18:00.0"]).ok, "a short bus id names the same GPU"
    decision = gate.check([0, "GPU-0003"])
    assert not decision.ok
    text = decision.explain()
    assert "GPU GPU-0003: 10.40 GiB used vs threshold 2.00 GiB (over threshold)" in text
    assert "top holders: engine rollout-3: 9.4 GiB, unattributed: 1.0 GiB" in text
    assert decision.used_bytes == {"0": int(0.5 * GIB), "GPU-0003": int(10.4 * GIB)}


def test_missing_and_stale_samples_block():
    gate = ResidualGate(2, source=FixedSource([sample(0, 0.1, age=60)]), max_age_s=5)
    stale = gate.check([0])
    assert not stale.ok and "stale: last sample 60.0s old > 5s" in stale.explain()
    missing = gate.check([7])
    assert not missing.ok and "no sample for this GPU" in missing.explain()


def test_consecutive_clear_samples():
    values = iter([0.5, 5.0, 0.5, 0.5, 0.5])

    class Flapping:
        name = "flapping"

        def read(self, node):
            return [sample(0, next(values))]

    seen = []
    gate = ResidualGate(2, source=Flapping(), clear_samples=2, poll_s=0.01)
    gate.wait([0], timeout=5, on_poll=lambda d, _: seen.append(d.ok))
    assert seen == [True, False, True, True]


def test_wait_times_out_with_the_last_decision():
    gate = ResidualGate(2, source=FixedSource([sample(0, 5)]), poll_s=0.05)
    with pytest.raises(GateTimeout) as caught:
        gate.wait([0], timeout=0.3)
    assert not caught.value.decision.ok and "5.00 GiB used" in str(caught.value)


def test_hostile_strings_are_escaped_in_the_query():
    hostile = 'n1"} or vector(1) or {x="'
    query = build_query(hostile)
    assert escape_label_value(hostile) in query
    assert query.count('node="') == 2 and query.count('node="n1\\"} or vector(1) or {x=\\""}') == 2
    assert escape_label_value("a\\b\nc") == "a\\\\b\\nc"


# ---------- end to end: real Prometheus scraping the real exporter on the fake NVML ----------


@pytest.fixture
def stack(exporter_factory, prometheus_factory, scenario, spawn_tree, tmp_path, monkeypatch):
    from exporter.registry import register_engine

    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", visible_devices(scenario))  # the gate sees every GPU

    tree = spawn_tree()
    register_engine("rollout-0", root_pid=tree.pid, directory=tmp_path / "reg")
    scenario.gpus[0].processes = [(tree.leaves[0], 9 * GIB)]
    scenario.gpus[0].used = 10 * GIB
    scenario.gpus[1].used = GIB // 2
    scenario.write()
    exporter = exporter_factory(scenario, "--registry.dir", str(tmp_path / "reg"), "--no-engines.discover")
    prometheus = prometheus_factory([exporter.url.removeprefix("http://")])
    prometheus.wait_for('gpu_residency_memory_used_bytes{gpu="0"}')
    return exporter, prometheus, scenario


def test_e2e_wait_returns_soon_after_memory_drops(stack):
    _, prometheus, scenario = stack
    gate = ResidualGate(2, source="prometheus", prometheus_url=prometheus.url, poll_s=0.25, max_age_s=5)
    blocked = gate.check([0], node="test-node")
    assert not blocked.ok and "engine rollout-0: 9.0 GiB" in blocked.explain()
    result = {}

    def waiter():
        result["decision"] = gate.wait([0, 1], node="test-node", timeout=30)
        result["at"] = time.monotonic()

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(1.0)
    scenario.gpus[0].used, scenario.gpus[0].processes = GIB, []
    scenario.write()
    dropped = time.monotonic()
    thread.join(timeout=30)
    assert result["decision"].ok
    latency = result["at"] - dropped
    assert latency < 1.0 + 0.25 + 1.0, f"took {latency:.2f}s (scrape 1 s + poll 0.25 s + 1 s)"


def test_e2e_uuid_and_index_give_the_same_decision(stack):
    _, prometheus, scenario = stack
    gate = ResidualGate(2, source="prometheus", prometheus_url=prometheus.url, max_age_s=5)
    by_index, by_uuid = (
        gate.check([0, 1], node="test-node"),
        gate.check([scenario.gpus[0].uuid, scenario.gpus[1].uuid], node="test-node"),
    )
    assert (
        (by_index.ok, [v.clear for v in by_index.gpus])
        == (by_uuid.ok, [v.clear for v in by_uuid.gpus])
        == (False, [False, True])
    )
    assert [v.sample.used_bytes for v in by_index.gpus] == [v.sample.used_bytes for v in by_uuid.gpus]


def test_e2e_hostile_node_or_gpu_cannot_widen_the_query(stack):
    _, prometheus, scenario = stack
    gate = ResidualGate(100, source="prometheus", prometheus_url=prometheus.url, max_age_s=5)
    bus = scenario.gpus[1].pci_bus_id  # a bus id is asked of the node's GPUs: the node is in the query
    assert gate.check([bus], node="test-node").ok
    for node in ('x",node=~".*', 'x"} or gpu_residency_memory_used_bytes{node=~".*', "x\\", "test-node\n"):
        decision = gate.check([bus], node=node)
        assert not decision.ok and "no sample for this GPU" in decision.explain(), node
    decision = gate.check(['1"} or vector(1)'], node="test-node")
    assert not decision.ok
    # An index is resolved to its UUID and asked by it: which node the caller names does not matter.
    assert gate.check([1], node='x",node=~".*').ok


def test_e2e_stopped_exporter_blocks_at_once_on_prometheus_staleness(stack):
    """Prometheus marks a down target's series stale at its next scrape: the gate blocks then,
    not `max_age_s` later (60 s here)."""
    exporter, prometheus, _ = stack
    gate = ResidualGate(100, source="prometheus", prometheus_url=prometheus.url, max_age_s=60)
    clear = gate.check([1], node="test-node")
    assert clear.ok and clear.gpus[0].sample.age_seconds < 3, "the age is the sample's, from timestamp()"
    exporter.stop()
    stopped = time.monotonic()
    deadline = stopped + 10
    while gate.check([1], node="test-node").ok and time.monotonic() < deadline:
        time.sleep(0.1)
    decision = gate.check([1], node="test-node")
    assert not decision.ok and "no sample for this GPU" in decision.explain()
    assert time.monotonic() - stopped < 5, "blocked within a scrape interval or two of the target going down"


def test_e2e_stopped_prometheus_blocks_with_a_clear_error_and_fail_open_passes(stack):
    _, prometheus, _ = stack
    closed = ResidualGate(100, source="prometheus", prometheus_url=prometheus.url)
    opened = ResidualGate(100, source="prometheus", prometheus_url=prometheus.url, fail_open=True)
    assert closed.check([1], node="test-node").ok
    prometheus.stop()
    decision = closed.check([1], node="test-node")
    assert not decision.ok and "prometheus source: cannot reach" in decision.explain()
    decision = opened.check([1], node="test-node")
    assert decision.ok and decision.fail_open and "fail-open" in decision.explain()


def test_e2e_cli_exit_codes_against_prometheus(stack):
    _, prometheus, _ = stack
    base = [sys.executable, "-m", "gate", "check", "--source", "prometheus", "--prometheus-url", prometheus.url,
            "--node", "test-node", "--threshold-gb", "2"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    clear = subprocess.run([*base, "--gpus", "1"], capture_output=True, text=True, env=env, check=False)
    assert clear.returncode == 0, clear.stdout + clear.stderr
    blocked = subprocess.run([*base, "--gpus", "0,1", "--json"], capture_output=True, text=True, env=env, check=False)
    assert blocked.returncode == 1 and '"ok": false' in blocked.stdout
    bad = subprocess.run(
        [*base, "--gpus", "0", "--max-age", "-1"], capture_output=True, text=True, env=env, check=False
    )
    assert bad.returncode == 2 and "must be > 0" in bad.stderr and "Traceback" not in bad.stderr


# ---------- the same through local NVML, no Prometheus ----------


@pytest.fixture
def nvml_gate_env(fake_nvml_dir, scenario, monkeypatch):
    monkeypatch.setenv("FAKE_NVML_SCENARIO", str(scenario.path))
    ctypes.CDLL(str(fake_nvml_dir / fakenvml.SONAME))  # the binding's dlopen by soname finds this
    scenario.gpus[0].used, scenario.gpus[1].used = 10 * GIB, GIB // 2
    scenario.gpus[0].processes = [(os.getpid(), 9 * GIB)]
    scenario.write()
    return scenario


def test_nvml_wait_returns_soon_after_memory_drops(nvml_gate_env):
    scenario = nvml_gate_env
    gate = ResidualGate(2, source=NvmlSource(), poll_s=0.1)
    blocked = gate.check([0])
    assert not blocked.ok and f"pid {os.getpid()}" in blocked.explain()
    timer = threading.Timer(0.5, lambda: (setattr(scenario.gpus[0], "used", GIB), scenario.write()))
    timer.start()
    started = time.monotonic()
    decision = gate.wait([0, 1], timeout=10)
    assert decision.ok and time.monotonic() - started < 0.5 + 0.1 + 1.0


def test_nvml_uuid_index_and_bus_id_agree(nvml_gate_env):
    scenario = nvml_gate_env
    gate = ResidualGate(2, source=NvmlSource())
    names = ([0, 1], [g.uuid for g in scenario.gpus], [g.pci_bus_id for g in scenario.gpus])
    decisions = [gate.check(n) for n in names]
    assert {(d.ok, tuple(v.clear for v in d.gpus)) for d in decisions} == {(False, (False, True))}


def test_nvml_lost_gpu_or_unknown_gpu_blocks(nvml_gate_env):
    scenario = nvml_gate_env
    scenario.gpus[1].errors = {"memory": GPU_IS_LOST}
    scenario.write()
    gate = ResidualGate(100, source=NvmlSource())
    assert not gate.check([1]).ok and "no sample for this GPU" in gate.check([1]).explain()
    assert not gate.check(["GPU-does-not-exist"]).ok


def test_drop_in_shapes(nvml_gate_env, monkeypatch):
    scenario = nvml_gate_env
    monkeypatch.setenv("GPU_RESIDENCY_GATE_SOURCE", "nvml")
    assert probe_max_used_gpu_mem_gb([0, 1]) == pytest.approx(10.0)
    assert probe_max_used_gpu_mem_gb([0, 5]) is None, "cannot measure GPU 5: None, not a number"
    with pytest.raises(GateTimeout):
        wait_for_residual([0], threshold_gb=2, timeout_s=0.3, poll_s=0.1)
    scenario.gpus[0].used = GIB
    scenario.write()
    assert wait_for_residual([0, 1], threshold_gb=2, timeout_s=5) == pytest.approx(1.0)


def test_cli_with_nvml_source(fake_nvml_dir, nvml_gate_env):
    env = nvml_gate_env.environ(fake_nvml_dir)
    env["PYTHONPATH"] = str(ROOT)

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "gate", *a], capture_output=True, text=True, env=env, timeout=60, check=False
        )

    assert run("check", "--source", "nvml", "--gpus", "1").returncode == 0
    result = run("wait", "--source", "nvml", "--gpus", "0", "--timeout", "0.5", "--poll", "0.1")
    assert result.returncode == 1 and "timed out" in result.stderr and "over threshold" in result.stdout
    assert run("check", "--source", "nvml", "--gpus", "").returncode == 2


def test_cli_shows_progress_on_a_terminal(fake_nvml_dir, nvml_gate_env):
    import pty

    env = nvml_gate_env.environ(fake_nvml_dir)
    env["PYTHONPATH"] = str(ROOT)
    controller, terminal = pty.openpty()
    command = [
        sys.executable,
        "-m",
        "gate",
        "wait",
        "--source",
        "nvml",
        "--gpus",
        "0",
        "--timeout",
        "1",
        "--poll",
        "0.2",
    ]
    proc = subprocess.Popen(command, env=env, stderr=terminal, stdout=subprocess.PIPE, text=True)
    os.close(terminal)
    proc.wait(timeout=60)
    shown = b""
    with contextlib.suppress(OSError):  # EIO once the terminal's other end is closed
        while chunk := os.read(controller, 4096):
            shown += chunk
    os.close(controller)
    assert proc.returncode == 1
    assert shown.count(b"\r") >= 3 and b"blocked: max 10.00 GiB (threshold 2.00 GiB)" in shown
