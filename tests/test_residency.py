"""Engine residency on real process trees over the fake NVML (the collector in-process)."""

from __future__ import annotations

import subprocess
import sys

from conftest import one, values

from exporter.registry import register_engine, unregister_engine
from fakenvml import FUNCTION_NOT_FOUND, GIB, GPU_IS_LOST, NOT_SUPPORTED


def test_grandchildren_on_one_gpu_sum_into_their_engine(local_exporter, scenario, spawn_tree):
    tree = spawn_tree(leaves=2)
    register_engine("rollout-0", root_pid=tree.pid, directory=local_exporter.registry_dir)
    scenario.gpus[0].processes = [(tree.leaves[0], 3 * GIB), (tree.leaves[1], 2 * GIB)]
    scenario.gpus[0].used = 6 * GIB
    scenario.write()

    m = local_exporter.scrape()

    assert one(m, "gpu_residency_engine_memory_bytes", engine="rollout-0", gpu=0) == 5 * GIB
    assert one(m, "gpu_residency_process_memory_bytes", pid=tree.leaves[0], engine="rollout-0") == 3 * GIB
    assert one(m, "gpu_residency_engine_up", engine="rollout-0", kind="sglang") == 1
    assert values(m, "gpu_residency_engine_memory_bytes", gpu=1) == []


def test_tensor_parallel_engine_spans_two_gpus(local_exporter, scenario, spawn_tree):
    tree = spawn_tree(leaves=2)
    register_engine("tp2", root_pid=tree.pid, directory=local_exporter.registry_dir)
    scenario.gpus[0].processes = [(tree.leaves[0], 7 * GIB)]
    scenario.gpus[1].processes = [(tree.leaves[1], 9 * GIB)]
    scenario.gpus[0].used, scenario.gpus[1].used = 8 * GIB, 9 * GIB
    scenario.write()

    m = local_exporter.scrape()

    assert one(m, "gpu_residency_engine_memory_bytes", engine="tp2", gpu=0) == 7 * GIB
    assert one(m, "gpu_residency_engine_memory_bytes", engine="tp2", gpu=1) == 9 * GIB
    uuid1 = scenario.gpus[1].uuid
    assert one(m, "gpu_residency_engine_memory_bytes", engine="tp2", uuid=uuid1) == 9 * GIB


def test_two_engines_and_a_stranger_on_one_gpu(local_exporter, scenario, spawn_tree):
    first, second, stranger = spawn_tree(), spawn_tree(), spawn_tree(title="python")
    register_engine("a", root_pid=first.pid, directory=local_exporter.registry_dir)
    register_engine("b", root_pid=second.pid, directory=local_exporter.registry_dir)
    scenario.gpus[0].processes = [(first.leaves[0], 4 * GIB), (second.leaves[0], 6 * GIB), (stranger.leaves[0], GIB)]
    scenario.gpus[0].used = 12 * GIB
    scenario.write()

    m = local_exporter.scrape()

    assert one(m, "gpu_residency_engine_memory_bytes", engine="a", gpu=0) == 4 * GIB
    assert one(m, "gpu_residency_engine_memory_bytes", engine="b", gpu=0) == 6 * GIB
    assert one(m, "gpu_residency_process_memory_bytes", pid=stranger.leaves[0], engine="") == GIB
    engines = {lbl["engine"] for lbl, _ in m["gpu_residency_engine_memory_bytes"]}
    assert engines == {"a", "b"}
    assert one(m, "gpu_residency_unattributed_memory_bytes", gpu=0) == 1 * GIB
    # The residuals the fleet rules used to rebuild: outside both engines, and claimed by no recognised
    # holder (the stranger is a plain process: its GiB and the unlisted GiB are nobody's).
    assert one(m, "gpu_residency_residual_outside_engines_bytes", gpu=0) == 2 * GIB
    assert one(m, "gpu_residency_residual_unclaimed_bytes", gpu=0) == 2 * GIB


def test_unattributed_is_used_minus_every_listed_process(local_exporter, scenario, spawn_tree):
    tree = spawn_tree(leaves=2)
    scenario.gpus[1].processes = [(tree.leaves[0], 2 * GIB), (tree.leaves[1], 3 * GIB)]
    scenario.gpus[1].used = 10 * GIB
    scenario.write()

    m = local_exporter.scrape()

    assert one(m, "gpu_residency_unattributed_memory_bytes", gpu=1) == 5 * GIB
    assert one(m, "gpu_residency_unattributed_memory_bytes", gpu=0) == 0  # known: nothing listed, nothing used


def test_a_process_gone_before_the_proc_read_keeps_its_memory_but_no_engine(local_exporter, scenario, spawn_tree):
    tree = spawn_tree()
    register_engine("e", root_pid=tree.pid, directory=local_exporter.registry_dir)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    scenario.gpus[0].processes = [(tree.leaves[0], GIB), (gone.pid, 2 * GIB)]
    scenario.gpus[0].used = 3 * GIB
    scenario.write()

    m = local_exporter.scrape()

    assert one(m, "gpu_residency_process_memory_bytes", pid=gone.pid) == 2 * GIB
    assert one(m, "gpu_residency_process_memory_bytes", pid=gone.pid, engine="", comm="") == 2 * GIB
    assert one(m, "gpu_residency_engine_memory_bytes", engine="e", gpu=0) == GIB
    assert one(m, "gpu_residency_unattributed_memory_bytes", gpu=0) == 0


def test_pid_reused_by_an_unrelated_process_is_not_the_engine(local_exporter, scenario, spawn_tree):
    unrelated = spawn_tree()
    path = register_engine("old", root_pid=unrelated.pid, directory=local_exporter.registry_dir)
    # The entry was written for an earlier process with this PID: a different start time.
    text = path.read_text()
    import json

    entry = json.loads(text)
    entry["start_ticks"] -= 1
    path.write_text(json.dumps(entry))
    scenario.gpus[0].processes = [(unrelated.leaves[0], 4 * GIB)]
    scenario.gpus[0].used = 4 * GIB
    scenario.write()

    m = local_exporter.scrape()

    assert one(m, "gpu_residency_engine_up", engine="old") == 0
    assert values(m, "gpu_residency_engine_memory_bytes", engine="old") == []
    assert one(m, "gpu_residency_process_memory_bytes", pid=unrelated.leaves[0], engine="") == 4 * GIB


def test_a_vanished_engine_leaves_no_stale_series(local_exporter, scenario, spawn_tree):
    tree = spawn_tree()
    register_engine("short", root_pid=tree.pid, directory=local_exporter.registry_dir)
    scenario.gpus[0].processes = [(tree.leaves[0], GIB)]
    scenario.gpus[0].used = GIB
    scenario.write()
    assert one(local_exporter.scrape(), "gpu_residency_engine_memory_bytes", engine="short") == GIB

    tree.root.terminate()
    tree.root.wait(timeout=10)
    scenario.gpus[0].processes = []
    scenario.write()
    m = local_exporter.scrape()
    assert values(m, "gpu_residency_engine_memory_bytes", engine="short") == []
    assert values(m, "gpu_residency_process_memory_bytes", pid=tree.leaves[0]) == []
    assert one(m, "gpu_residency_engine_up", engine="short") == 0

    unregister_engine("short", directory=local_exporter.registry_dir)
    assert values(local_exporter.scrape(), "gpu_residency_engine_up", engine="short") == []


def test_lost_gpu_drops_its_series_and_counts_the_error(local_exporter, scenario, spawn_tree):
    tree = spawn_tree()
    scenario.gpus[0].used = 5 * GIB
    scenario.gpus[1].used = 6 * GIB
    scenario.gpus[1].processes = [(tree.leaves[0], 6 * GIB)]
    scenario.gpus[1].errors = {"memory": GPU_IS_LOST, "processes": GPU_IS_LOST}
    scenario.write()

    m = local_exporter.scrape()

    assert one(m, "gpu_residency_memory_used_bytes", gpu=0) == 5 * GIB
    for name in ("memory_used_bytes", "memory_total_bytes", "unattributed_memory_bytes", "process_memory_bytes"):
        assert values(m, f"gpu_residency_{name}", gpu=1) == [], name
    assert one(m, "gpu_residency_errors_total", source="nvml", reason="gpu_is_lost") >= 1
    assert one(m, "gpu_residency_nvml_up") == 1


def test_process_lists_not_supported_give_no_process_series_and_no_unattributed(local_exporter, scenario, spawn_tree):
    tree = spawn_tree()
    scenario.gpus[0].used = 5 * GIB
    scenario.gpus[0].processes = [(tree.leaves[0], 5 * GIB)]
    scenario.gpus[0].errors = {"processes": NOT_SUPPORTED}
    scenario.write()

    m = local_exporter.scrape()

    assert one(m, "gpu_residency_memory_used_bytes", gpu=0) == 5 * GIB
    assert values(m, "gpu_residency_process_memory_bytes", gpu=0) == []
    assert values(m, "gpu_residency_unattributed_memory_bytes", gpu=0) == []
    for residual in ("outside_engines", "unclaimed"):
        assert values(m, f"gpu_residency_residual_{residual}_bytes", gpu=0) == [], "unknown is absent"
    assert one(m, "gpu_residency_errors_total", source="nvml", reason="not_supported") >= 1


def test_unknown_process_memory_is_absent_not_zero(local_exporter, scenario, spawn_tree):
    tree = spawn_tree()
    register_engine("e", root_pid=tree.pid, directory=local_exporter.registry_dir)
    scenario.gpus[0].used = 5 * GIB
    scenario.gpus[0].processes = [(tree.leaves[0], -1)]  # NVML: value not available
    scenario.write()

    m = local_exporter.scrape()

    assert values(m, "gpu_residency_process_memory_bytes", pid=tree.leaves[0]) == []
    assert values(m, "gpu_residency_engine_memory_bytes", engine="e") == []
    assert values(m, "gpu_residency_unattributed_memory_bytes", gpu=0) == []
    assert values(m, "gpu_residency_residual_outside_engines_bytes", gpu=0) == [], "its engine's share is unknown"


def test_older_driver_falls_back_to_memory_v1_and_process_v2(local_exporter, scenario, spawn_tree):
    tree = spawn_tree()
    scenario.gpus[0].used = 4 * GIB
    scenario.gpus[0].reserved = GIB
    scenario.gpus[0].processes = [(tree.leaves[0], 3 * GIB)]
    scenario.gpus[0].errors = {"memory_v2": FUNCTION_NOT_FOUND, "processes_v3": FUNCTION_NOT_FOUND}
    scenario.write()

    m = local_exporter.scrape()

    assert one(m, "gpu_residency_memory_used_bytes", gpu=0) == 5 * GIB  # v1 counts reserved as used
    assert values(m, "gpu_residency_memory_reserved_bytes", gpu=0) == []
    assert one(m, "gpu_residency_memory_reserved_bytes", gpu=1) == scenario.gpus[1].reserved
    assert one(m, "gpu_residency_process_memory_bytes", pid=tree.leaves[0]) == 3 * GIB
    assert values(m, "gpu_residency_errors_total", reason="function_not_found") == []


def test_a_process_in_both_compute_and_graphics_lists_counts_once(local_exporter, scenario, spawn_tree):
    tree = spawn_tree()
    scenario.gpus[0].used = 2 * GIB
    scenario.gpus[0].processes = [(tree.leaves[0], 2 * GIB)]
    scenario.gpus[0].graphics_processes = [(tree.leaves[0], 2 * GIB)]
    scenario.write()

    m = local_exporter.scrape()

    assert values(m, "gpu_residency_process_memory_bytes", pid=tree.leaves[0]) == [2 * GIB]
    assert one(m, "gpu_residency_unattributed_memory_bytes", gpu=0) == 0


def test_gpu_identity_labels(local_exporter, scenario):
    m = local_exporter.scrape()
    gpu = scenario.gpus[1]
    labels = next(lbl for lbl, _ in m["gpu_residency_memory_total_bytes"] if lbl["gpu"] == "1")
    assert labels == {
        "node": "test-node",
        "gpu": "1",
        "uuid": gpu.uuid,
        "pci_bus_id": gpu.pci_bus_id,
        "model": gpu.name,
    }
