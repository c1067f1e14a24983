"""MIG devices measured and attributed like GPUs, over the fake NVML's MIG calls and the real
nvidia-ml-py (the collector in-process)."""

from __future__ import annotations

import ctypes
import os
import subprocess

import pytest
from conftest import one, require_tool, values
from prometheus_client import CollectorRegistry, generate_latest

import fakenvml
from exporter.registry import register_engine
from fakenvml import GIB, FakeMig

MIB = 1024**2


def mig_node(scenario, *instances: FakeMig) -> None:
    """GPU 0 with MIG on and these devices; GPU 1 a whole GPU (no MIG at all)."""
    gpu = scenario.gpus[0]
    gpu.mig_mode, gpu.mig = 1, list(instances)
    gpu.processes = []
    gpu.used = sum(instance.used for instance in instances)
    scenario.write()


def calls(fake_nvml_dir, name: str) -> int:
    lib = ctypes.CDLL(str(fake_nvml_dir / fakenvml.SONAME))  # the library this process's pynvml loaded
    lib.fakeNvmlCallCount.restype = ctypes.c_ulong
    return lib.fakeNvmlCallCount(name.encode())


def test_every_mig_device_is_measured_and_nothing_counts_twice(local_exporter, scenario, spawn_tree):
    tree = spawn_tree(leaves=3)
    register_engine("rollout", root_pid=tree.pid, directory=local_exporter.registry_dir)
    a, b, c = tree.leaves
    mig_node(
        scenario,
        FakeMig(gi=1, used=4 * GIB, processes=[(a, 3 * GIB)]),
        FakeMig(gi=2, used=5 * GIB, processes=[(b, 2 * GIB), (c, 2 * GIB)]),
        FakeMig(gi=3, profile="3g.40gb", total=40 * GIB, used=1 * GIB),
    )
    uuids = scenario.gpus[0].mig_uuids

    m = local_exporter.scrape()

    used = {s["mig_instance"]: v for s, v in m["gpu_residency_mig_memory_used_bytes"] if s["gpu"] == "0"}
    assert used == {"1/0": 4 * GIB, "2/0": 5 * GIB, "3/0": 1 * GIB}
    assert one(m, "gpu_residency_mig_memory_total_bytes", mig_instance="3/0", mig_profile="3g.40gb") == 40 * GIB
    assert one(m, "gpu_residency_mig_memory_used_bytes", mig_uuid=uuids[1], uuid=scenario.gpus[0].uuid) == 5 * GIB
    # The parent GPU's series stay, and equal the sum of its devices: nothing is counted twice.
    assert one(m, "gpu_residency_memory_used_bytes", gpu=0) == sum(used.values())
    assert values(m, "gpu_residency_mig_memory_used_bytes", gpu=1) == []
    # Per process and per engine, each on its device; the engine's rows sum to its GPU figure.
    assert one(m, "gpu_residency_process_memory_bytes", pid=c, mig_instance="2/0", mig_uuid=uuids[1]) == 2 * GIB
    engine = {s["mig_instance"]: v for s, v in m["gpu_residency_engine_memory_bytes"] if s["engine"] == "rollout"}
    assert engine == {"1/0": 3 * GIB, "2/0": 4 * GIB}
    assert sum(values(m, "gpu_residency_process_memory_bytes", gpu=0)) == sum(engine.values())
    mig_rest = {s["mig_instance"]: v for s, v in m["gpu_residency_mig_unattributed_memory_bytes"]}
    assert mig_rest == {"1/0": 1 * GIB, "2/0": 1 * GIB, "3/0": 1 * GIB}
    assert one(m, "gpu_residency_unattributed_memory_bytes", gpu=0) == sum(mig_rest.values())
    # The GPU's residual outside engines takes the engine's rows on every device once: 10 - 7 GiB.
    assert one(m, "gpu_residency_residual_outside_engines_bytes", gpu=0) == sum(used.values()) - sum(engine.values())


def test_compute_instances_of_one_gpu_instance_share_its_memory_counted_once(local_exporter, scenario, spawn_tree):
    tree = spawn_tree(leaves=2)
    a, b = tree.leaves
    # GPU instance 1 has two compute instances: NVML reports the GPU instance's memory on both.
    shared = {"gi": 1, "profile": "2g.20gb", "total": 20 * GIB, "used": 6 * GIB}
    first, second = FakeMig(ci=0, processes=[(a, 2 * GIB)], **shared), FakeMig(ci=1, processes=[(b, 3 * GIB)], **shared)
    mig_node(scenario, first, second, FakeMig(gi=2, used=GIB))
    scenario.gpus[0].used = 7 * GIB
    scenario.write()

    m = local_exporter.scrape()

    used = {s["mig_instance"]: v for s, v in m["gpu_residency_mig_memory_used_bytes"]}
    assert used == {"1/0": 6 * GIB, "2/0": GIB}, "the GPU instance's memory once, on its first compute instance"
    assert sum(used.values()) == one(m, "gpu_residency_memory_used_bytes", gpu=0)
    assert one(m, "gpu_residency_process_memory_bytes", pid=b, mig_instance="1/1") == 3 * GIB
    rest = {s["mig_instance"]: v for s, v in m["gpu_residency_mig_unattributed_memory_bytes"]}
    assert rest == {"1/0": 1 * GIB, "2/0": 1 * GIB}, "both compute instances' processes count against it"


def test_the_gate_judges_a_gpu_instance_with_several_compute_instances_by_its_one_memory(
    fake_nvml_dir, scenario, monkeypatch
):
    from gate import ResidualGate
    from gate.nvml_source import NvmlSource

    monkeypatch.setenv("FAKE_NVML_SCENARIO", str(scenario.path))
    ctypes.CDLL(str(fake_nvml_dir / fakenvml.SONAME))
    shared = {"gi": 1, "total": 20 * GIB, "used": 6 * GIB}
    mig_node(scenario, FakeMig(ci=0, **shared), FakeMig(ci=1, **shared))
    decision = ResidualGate(8, source=NvmlSource()).check(["0:1", scenario.gpus[0].mig_uuids[1]])
    assert decision.ok, decision.explain()
    assert [v.sample.used_bytes for v in decision.gpus] == [6 * GIB, 6 * GIB]


def test_a_process_nvml_does_not_place_goes_to_the_slice_its_environment_names(
    local_exporter, scenario, spawn_tree, monkeypatch
):
    mig_node(scenario, FakeMig(gi=1, used=2 * GIB), FakeMig(gi=5, used=3 * GIB))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", scenario.gpus[0].mig_uuids[1])
    tree = spawn_tree(leaves=1)
    register_engine("on-slice", root_pid=tree.pid, directory=local_exporter.registry_dir)
    scenario.gpus[0].processes = [(tree.leaves[0], 2 * GIB)]  # listed on the GPU without instance ids
    scenario.write()

    m = local_exporter.scrape()

    assert one(m, "gpu_residency_engine_memory_bytes", engine="on-slice") == 2 * GIB
    assert one(m, "gpu_residency_engine_memory_bytes", engine="on-slice", mig_instance="5/0") == 2 * GIB
    assert one(m, "gpu_residency_mig_unattributed_memory_bytes", mig_instance="5/0") == 1 * GIB


def test_a_process_placed_nowhere_leaves_the_slices_unattributed_unknown(local_exporter, scenario, spawn_tree):
    mig_node(scenario, FakeMig(gi=1, used=2 * GIB))
    tree = spawn_tree(leaves=1)
    scenario.gpus[0].processes = [(tree.leaves[0], 1 * GIB)]  # no instance ids, no CUDA_VISIBLE_DEVICES
    scenario.write()

    m = local_exporter.scrape()

    assert one(m, "gpu_residency_process_memory_bytes", pid=tree.leaves[0], mig_instance="") == 1 * GIB
    assert values(m, "gpu_residency_mig_unattributed_memory_bytes") == []  # unknown is absent, never a guess
    assert one(m, "gpu_residency_mig_memory_used_bytes", mig_instance="1/0") == 2 * GIB


def test_a_layout_change_costs_one_collection_and_leaves_no_stale_instance(local_exporter, scenario, spawn_tree):
    tree = spawn_tree(leaves=1)
    first, second = FakeMig(gi=1, used=1 * GIB), FakeMig(gi=2, used=2 * GIB)
    mig_node(scenario, first, second)
    assert len(local_exporter.scrape()["gpu_residency_mig_memory_used_bytes"]) == 2

    # gi 2 destroyed, gi 2 created again (a new UUID) and gi 3 created, all between two scrapes.
    reborn = FakeMig(gi=2, profile="2g.20gb", used=6 * GIB, serial=1)
    mig_node(scenario, first, reborn, FakeMig(gi=3, used=0, processes=[]))
    m = local_exporter.scrape()
    got = {(s["mig_instance"], s["mig_uuid"], s["mig_profile"]) for s, _ in m["gpu_residency_mig_memory_used_bytes"]}
    uuids = scenario.gpus[0].mig_uuids
    assert got == {("1/0", uuids[0], "1g.10gb"), ("2/0", uuids[1], "2g.20gb"), ("3/0", uuids[2], "1g.10gb")}

    # A device created with a process on it: the parent's process list names it, read at once.
    mig_node(scenario, first, reborn, FakeMig(gi=3), FakeMig(gi=4, used=GIB, processes=[(tree.leaves[0], GIB)]))
    m = local_exporter.scrape()
    assert one(m, "gpu_residency_process_memory_bytes", pid=tree.leaves[0], mig_instance="4/0") == GIB
    assert one(m, "gpu_residency_mig_memory_used_bytes", mig_instance="4/0") == GIB
    assert values(m, "gpu_residency_errors_total", source="nvml") == []


def test_failed_mig_look_ups_are_made_once_per_nvml_session(local_exporter, scenario, fake_nvml_dir):
    mig_node(scenario, FakeMig(gi=1, slot=3))  # one device: six empty slots answer NOT_FOUND
    local_exporter.scrape()
    handles, modes = calls(fake_nvml_dir, "mig_handle"), calls(fake_nvml_dir, "mig_mode")

    for _ in range(5):
        assert one(local_exporter.scrape(), "gpu_residency_mig_memory_used_bytes", mig_instance="1/0") == 0

    assert calls(fake_nvml_dir, "mig_handle") == handles  # no slot is asked again, empty or not
    assert calls(fake_nvml_dir, "mig_mode") == modes  # read with the layout; GPU 1 (no MIG) once a session


def test_promtool_accepts_the_mig_families(local_exporter, scenario, spawn_tree):
    promtool = require_tool("promtool")
    tree = spawn_tree(leaves=1)
    register_engine("e", root_pid=tree.pid, directory=local_exporter.registry_dir)
    mig_node(scenario, FakeMig(gi=1, used=GIB, processes=[(tree.leaves[0], 512 * MIB)]))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(local_exporter.collector)
    body = generate_latest(registry).decode()
    assert "gpu_residency_mig_memory_used_bytes{" in body
    lint = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr


# ---------- the gate: a MIG device is waited on by its own memory ----------


def test_the_nvml_gate_reads_a_mig_device_by_its_uuid_or_gpu_gi(fake_nvml_dir, scenario, monkeypatch):
    from gate import ResidualGate
    from gate.nvml_source import NvmlSource

    monkeypatch.setenv("FAKE_NVML_SCENARIO", str(scenario.path))
    ctypes.CDLL(str(fake_nvml_dir / fakenvml.SONAME))
    mig_node(scenario, FakeMig(gi=1, used=3 * GIB, processes=[(os.getpid(), 2 * GIB)]), FakeMig(gi=2, used=GIB // 2))
    gate = ResidualGate(2, source=NvmlSource())
    held, free = scenario.gpus[0].mig_uuids

    blocked = gate.check([held])
    assert not blocked.ok and gate.check([free]).ok
    explained = blocked.explain()  # the device's own holders: this process, and what it leaves
    assert f"pid {os.getpid()}: 2.0 GiB" in explained and "unattributed: 1.0 GiB" in explained, explained
    assert not gate.check(["0:1"]).ok and gate.check(["0:2"]).ok
    assert gate.check([f"{scenario.gpus[0].uuid}:2"]).ok
    decision = gate.check(["0:2", free])
    assert [v.sample.used_bytes for v in decision.gpus] == [GIB // 2, GIB // 2]
    assert not gate.check([0]).ok, "the whole GPU is still the sum of its devices"
    assert "unattributed: 1.5 GiB" in gate.check([0]).explain()
    assert not gate.check(["0:7"]).ok and "no sample" in gate.check(["0:7"]).explain()


def test_sources_that_do_not_read_mig_refuse_a_mig_name_with_the_reason():
    from gate import GateConfigError, ResidualGate

    class Remote:
        name = "prometheus"

        def read(self, node):
            return []

    for name in ("MIG-4f1c2a3b-0000-0000-0000-000000000000", "0:1", "GPU-4f1c2a3b-0000-0000-0000-000000000000:3"):
        try:
            ResidualGate(2, source=Remote()).check([name])
        except GateConfigError as exc:
            assert "not supported by the prometheus source" in str(exc)
        else:
            raise AssertionError(f"{name} was not refused")
    assert ResidualGate(2, source=Remote()).check(["00000000:18:00.0"]).gpus[0].reason == "no sample for this GPU"


def test_the_exporter_and_prometheus_gates_read_a_mig_device(
    exporter_factory, prometheus_factory, scenario, spawn_tree
):
    import threading
    import time

    from gate import ResidualGate

    tree = spawn_tree(leaves=1)
    registry = scenario.path.parent / "engines"
    register_engine("on-mig", root_pid=tree.pid, directory=registry)
    held = FakeMig(gi=1, used=3 * GIB, processes=[(tree.leaves[0], 2 * GIB)])
    other = FakeMig(gi=2, used=GIB // 2)
    mig_node(scenario, held, other)
    exporter = exporter_factory(scenario, "--registry.dir", str(registry), "--no-engines.discover")
    gate = ResidualGate(2, source="exporter", exporter_url=exporter.url, poll_s=0.2)
    parent = scenario.gpus[0].uuid
    device, free = scenario.gpus[0].mig_uuids

    assert gate.check([f"{parent}:2", free]).ok
    blocked = gate.check([device])
    assert not blocked.ok and blocked.gpus[0].sample.used_bytes == 3 * GIB
    assert "engine on-mig: 2.0 GiB" in blocked.explain() and "unattributed: 1.0 GiB" in blocked.explain()

    def release() -> None:
        held.used = GIB // 4
        mig_node(scenario, held, other)

    timer = threading.Timer(0.5, release)
    timer.start()
    started = time.monotonic()
    try:
        decision = gate.wait([f"{parent}:1"], timeout=20)
    finally:
        timer.cancel()
    assert decision.ok and decision.gpus[0].sample.used_bytes == GIB // 4
    assert time.monotonic() - started < 10
    whole = gate.check([parent])  # the GPU itself, named alone, is read as the whole card: its devices' sum
    assert whole.ok and whole.gpus[0].sample.used_bytes == GIB // 4 + GIB // 2

    # The same through Prometheus: the device's own series, its age checked like a GPU's.
    held.used = 3 * GIB
    mig_node(scenario, held, other)
    prometheus = prometheus_factory([exporter.url.removeprefix("http://")])
    prometheus.wait_for(f'gpu_residency_mig_memory_used_bytes{{mig_instance="1/0"}} == {3 * GIB}')
    gate = ResidualGate(2, source="prometheus", prometheus_url=prometheus.url, max_age_s=30)
    for names in ([device], [f"{parent}:1"]):
        decision = gate.check(names, node="test-node")
        assert not decision.ok and decision.gpus[0].sample.used_bytes == 3 * GIB, decision.explain()
        assert "engine on-mig: 2.0 GiB" in decision.explain()
    assert gate.check([free, f"{parent}:2"], node="test-node").ok
    by_node = gate.check([parent], node="test-node")
    assert not by_node.ok and by_node.gpus[0].sample.used_bytes == 3 * GIB + GIB // 2


def test_the_nvidia_smi_gate_reads_mig_devices_from_list_and_summary(fake_nvml_dir, scenario, tmp_path, monkeypatch):
    from fakenvml.smi import install
    from gate import ResidualGate
    from gate.identity import parse_smi_list
    from gate.smi_source import NvidiaSmiSource

    mig_node(scenario, FakeMig(gi=3, used=3 * GIB), FakeMig(gi=5, profile="2g.20gb", used=GIB // 2, slot=4))
    install(tmp_path / "bin", fake_nvml_dir / fakenvml.SONAME, scenario.path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    assert f"  MIG 2g.20gb     Device  1: (UUID: {scenario.gpus[0].mig_uuids[1]})" in listing
    assert parse_smi_list(listing) == {0: scenario.gpus[0].uuid, 1: scenario.gpus[1].uuid}, "MIG lines are no GPUs"

    gate = ResidualGate(2, source=NvidiaSmiSource())
    held, free = scenario.gpus[0].mig_uuids
    assert not gate.check([held]).ok and gate.check([free]).ok
    assert gate.check(["0:5"]).ok and not gate.check(["0:3"]).ok and not gate.check([0]).ok
    assert gate.check(["0:5"]).gpus[0].sample.pci_bus_id == scenario.gpus[0].pci_bus_id


def test_a_mig_look_up_that_hangs_costs_a_deadline_never_a_hung_scrape(tmp_path, fake_nvml_dir, scenario, monkeypatch):
    import time

    from conftest import build_local

    monkeypatch.setenv("FAKE_NVML_SCENARIO", str(scenario.path))
    exporter = build_local(tmp_path / "engines", None, fake_nvml_dir, "--nvml.timeout", "0.5")
    first, second = FakeMig(gi=1, used=GIB), FakeMig(gi=2, used=GIB)
    mig_node(scenario, first, second)
    assert len(exporter.scrape()["gpu_residency_mig_memory_used_bytes"]) == 2
    scenario.gpus[0].hangs = {"mig_handle"}  # the driver hangs in the look-up the layout change needs
    mig_node(scenario, first)
    started = time.monotonic()
    m = exporter.scrape()
    assert time.monotonic() - started < 3 and one(m, "gpu_residency_nvml_up") == 0
    scenario.gpus[0].hangs = set()
    scenario.write()
    deadline = time.monotonic() + 20
    while one(m := exporter.scrape(), "gpu_residency_nvml_up") != 1:
        assert time.monotonic() < deadline, "NVML never came back"
        time.sleep(0.05)
    assert [s["mig_instance"] for s, _ in m["gpu_residency_mig_memory_used_bytes"]] == ["1/0"]


def test_the_fake_answers_nvmls_mig_calls_through_the_real_binding(fake_nvml_dir, scenario, monkeypatch):
    import pynvml

    monkeypatch.setenv("FAKE_NVML_SCENARIO", str(scenario.path))
    ctypes.CDLL(str(fake_nvml_dir / fakenvml.SONAME))
    mig_node(scenario, FakeMig(gi=4, ci=1, slot=2, profile="3g.40gb", used=GIB, processes=[(os.getpid(), GIB)]))
    pynvml.nvmlInit()
    parent, whole = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml.nvmlDeviceGetHandleByIndex(1)
    assert pynvml.nvmlDeviceGetMigMode(parent) == [1, 1] and pynvml.nvmlDeviceGetMaxMigDeviceCount(parent) == 7
    for slot in (0, 1, 3):  # empty slots
        with pytest.raises(pynvml.NVMLError_NotFound):
            pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, slot)
    mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, 2)
    assert pynvml.nvmlDeviceGetUUID(mig) == scenario.gpus[0].mig_uuids[0]
    assert pynvml.nvmlDeviceGetName(mig) == "NVIDIA H100 80GB HBM3 MIG 3g.40gb"
    assert (pynvml.nvmlDeviceGetGpuInstanceId(mig), pynvml.nvmlDeviceGetComputeInstanceId(mig)) == (4, 1)
    assert pynvml.nvmlDeviceIsMigDeviceHandle(mig).value == 1
    assert pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig)) == scenario.gpus[0].uuid
    assert pynvml.nvmlDeviceGetMemoryInfo(mig, version=pynvml.nvmlMemory_v2).used == GIB
    for handle in (mig, parent):  # the device lists its own; the GPU every device's, with their ids
        listed = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        assert [(p.pid, p.gpuInstanceId, p.computeInstanceId) for p in listed] == [(os.getpid(), 4, 1)]
    with pytest.raises(pynvml.NVMLError_NotSupported):  # a card without MIG
        pynvml.nvmlDeviceGetMigMode(whole)
    mig_node(scenario)  # the device destroyed: its handle fails as a stale one does
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetMemoryInfo(mig)
