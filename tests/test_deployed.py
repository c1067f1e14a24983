"""The exporter as the chart runs it (root, every capability dropped, read-only root filesystem,
hostPID) against frameworks as they run in pods (own PID namespace and /proc, uid 1000, umask 077)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    as_deployed,
    build_local,
    host_pid_of,
    in_container,
    kill_with_descendants,
    one,
    python_for_others,
    scrape_until,
    values,
)

from fakenvml import GIB

# A framework in a pod: starts an engine tree, registers it, reports an earlier engine's death and
# records a gate decision, all as uid 1000 with umask 077, then prints the leaves' PIDs as it sees them.
FRAMEWORK = """
import sys, time
from exporter.exits import report_exit
from exporter.registry import register_engine
from fakenvml.tree import start
from gate import GpuSample, ResidualGate

class Idle:
    name = "idle"
    def read(self, node):
        return [GpuSample(0, "GPU-0", "00000000:18:00.0", 0)]

registry = sys.argv[1]
tree = start(2, title="sglang::scheduler_TP{rank}", max_seconds=120)
register_engine("in-pod", root_pid=tree.pid, url="http://127.0.0.1:30000", directory=registry)
report_exit("in-pod-warmup", -9, directory=registry)
ResidualGate(2, source=Idle(), record_dir=registry).check([0], wake="in-pod")
print(" ".join(map(str, tree.leaves)), flush=True)
time.sleep(120)
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory uid 1000 can write (pytest's own tmp dirs are private to root)."""
    base = Path(tempfile.mkdtemp(prefix="gpu-residency-deployed-"))
    base.chmod(0o755)
    os.chown(base, 1000, 1000)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def framework_in_pod(
    registry: Path, env: dict[str, str], own_network: bool = False
) -> Iterator[tuple[subprocess.Popen, list[int]]]:
    proc = subprocess.Popen(
        [*in_container(own_network=own_network), python_for_others(), "-c", FRAMEWORK, str(registry)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"the framework did not start: {proc.stderr.read()[-2000:]}")
        yield proc, [int(pid) for pid in line.split()]
    finally:
        kill_with_descendants(proc)


def _engine_root(leaf: int) -> int:
    """The engine tree's root (the leaf's grandparent), as the host sees it."""
    pid = leaf
    for _ in range(2):
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat[stat.rfind(")") + 2 :].split()[1])
    return pid


def test_engine_from_another_pod_by_uid_1000_is_attributed_by_the_capability_less_exporter(
    exporter_factory, scenario, shared_dir, tmp_path, env_for_others
):
    registry = shared_dir / "registry"  # made by the framework itself, under umask 077
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    state = tmp_path / "state"
    state.mkdir()
    try:
        with framework_in_pod(registry, env_for_others) as (framework, inner_leaves):
            leaves = [host_pid_of(pid, under=framework.pid) for pid in inner_leaves]
            assert leaves != inner_leaves, "the framework sees its own PID namespace"
            # Host PID 1 named without proof: it would claim every process on the node.
            (registry / "host-init.json").write_text('{"name": "host-init", "root_pid": 1}')
            scenario.gpus[0].processes = [(leaves[0], 3 * GIB)]
            scenario.gpus[1].processes = [(leaves[1], 4 * GIB), (orphan.pid, GIB)]
            scenario.gpus[0].used, scenario.gpus[1].used = 3 * GIB, 5 * GIB
            scenario.write()
            exporter = exporter_factory(
                scenario, "--registry.dir", str(registry), "--no-engines.discover", "--state.dir", str(state),
                "--exits.grace-period", "0.5", wrapper=as_deployed(writable=[state]),
            )  # fmt: skip
            status = Path(f"/proc/{exporter.proc.pid}/status").read_text()
            assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status

            m = scrape_until(exporter, lambda m: values(m, "gpu_residency_engine_up", engine="in-pod") == [1])

            assert one(m, "gpu_residency_engine_up", engine="in-pod") == 1
            assert one(m, "gpu_residency_engine_memory_bytes", engine="in-pod", gpu=0) == 3 * GIB
            assert one(m, "gpu_residency_engine_memory_bytes", engine="in-pod", gpu=1) == 4 * GIB
            ((labels, used),) = [s for s in m["gpu_residency_process_memory_bytes"] if s[0]["pid"] == str(leaves[0])]
            assert labels["comm"].startswith("sglang::sched") and labels["engine"] == "in-pod" and used == 3 * GIB
            assert one(m, "gpu_residency_process_memory_bytes", pid=orphan.pid, engine="") == GIB
            assert one(m, "gpu_residency_engine_up", engine="host-init") == 0
            assert values(m, "gpu_residency_engine_memory_bytes", engine="host-init") == []
            assert one(m, "gpu_residency_errors_total", source="registry", reason="unproven_init") == 1
            # What uid 1000 wrote under umask 077 is readable: its exit event and its gate record.
            assert one(m, "gpu_residency_engine_exits_total", engine="in-pod-warmup", exit_code="-9") == 1
            assert one(m, "gpu_residency_gate_clear", engine="in-pod") == 1
            unreadable = [r for labels, _ in m.get("gpu_residency_errors_total", []) if (r := labels["reason"])
                          in ("unreadable", "refused", "unprovable")]  # fmt: skip
            assert unreadable == []
            modes = {str(p.relative_to(shared_dir)): p.stat().st_mode & 0o777 for p in [registry, *registry.rglob("*")]}
            assert modes["registry"] == 0o755 and modes["registry/gate"] == 0o755, modes
            written = ("registry/in-pod.json", "registry/events.jsonl", "registry/gate/in-pod.json")
            assert {modes[name] for name in written} == {0o644}, modes

            # The engine dies and nobody reports it: counted once, in the exporter's own state
            # (the registry belongs to uid 1000 and is not writable to the exporter).
            os.kill(_engine_root(leaves[0]), 9)
            m = scrape_until(exporter, lambda m: values(m, "gpu_residency_engine_exits_total", engine="in-pod"))
            assert one(m, "gpu_residency_engine_exits_total", engine="in-pod", exit_code="unknown") == 1
            assert (state / "exits.json").exists(), "the exporter's own state, in its own writable volume"
    finally:
        orphan.kill()
        orphan.wait()


def test_loopback_url_from_another_network_namespace_is_not_polled_and_says_why(
    exporter_factory, scenario, shared_dir, tmp_path, env_for_others
):
    registry = shared_dir / "registry"
    with framework_in_pod(registry, env_for_others, own_network=True):
        exporter = exporter_factory(scenario, "--registry.dir", str(registry), "--no-engines.discover",
                                    "--sglang.poll-interval", "0.2")  # fmt: skip
        m = scrape_until(
            exporter, lambda m: values(m, "gpu_residency_errors_total", source="sglang", reason="url_unreachable")
        )
        assert one(m, "gpu_residency_errors_total", source="sglang", reason="url_unreachable") == 1
        assert values(m, "gpu_residency_sglang_up", engine="in-pod") == []
        assert "loopback of another network namespace" in exporter.log()


def test_a_registry_shared_by_two_non_root_users_takes_both(local_exporter, shared_dir, fake_nvml_dir, env_for_others):
    """A 1777 registry (registry.mode in the chart): uid 1000 and uid 1001 both report exits and record
    gate decisions; the second writes its own events file instead of failing on the first's."""
    registry = shared_dir / "registry"
    registry.mkdir(mode=0o1777)
    registry.chmod(0o1777)
    code = (
        "import sys; from exporter.exits import report_exit; from gate import GpuSample, ResidualGate\n"
        "class Idle:\n    name = 'idle'\n    def read(self, node): return [GpuSample(0, 'GPU-0', '0:18:00.0', 0)]\n"
        "report_exit(sys.argv[2], -9, directory=sys.argv[1])\n"
        "ResidualGate(2, source=Idle(), record_dir=sys.argv[1]).check([0], wake=sys.argv[2])\n"
    )
    for uid in (1000, 1001):
        result = subprocess.run(
            [*in_container(uid=uid), python_for_others(), "-c", code, str(registry), f"engine-{uid}"],
            capture_output=True, text=True, timeout=60, env=env_for_others, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in registry.glob("events*.jsonl")) == ["events.1001.jsonl", "events.jsonl"]
    assert (registry / "gate").stat().st_mode & 0o7777 == 0o1777, "shared like its parent"
    assert sorted(p.name for p in (registry / "gate").iterdir()) == ["engine-1000.json", "engine-1001.json"]
    exporter = build_local(registry, None, fake_nvml_dir)
    m = exporter.scrape()
    for uid in (1000, 1001):
        assert one(m, "gpu_residency_engine_exits_total", engine=f"engine-{uid}", exit_code="-9") == 1
