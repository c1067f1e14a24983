"""Every holder named without registration: Ray actors, torchrun/Megatron ranks, vLLM and SGLang
workers, Kubernetes pods. Processes title themselves with the real setproctitle, as those frameworks do;
cgroup paths are real kernel paths (cgroup v1 here) and real fixtures from each runtime."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, kill_with_descendants, one, values

from exporter.registry import register_engine
from exporter.sources.proctable import parse_container, parse_pod_uid
from fakenvml import GIB
from fakenvml.interpreter import shebang_python
from gate import ResidualGate
from gpu_residency_common.holders import HolderId, classify_title, holder_of, launcher_of, title_from_cmdline

CONTEXT = GIB // 4  # per GPU: memory no process is charged for (driver, contexts)
CID = "a51a9f7d073f848e7fc59e56e8f11524f330a2175a4ed26327da2dfe0d28015f"
UID = "15513b48-e7a5-48fc-b9e3-92f713f36504"


@pytest.mark.parametrize(
    "title, expected",
    [
        ("ray::MegatronTrainRayActor.train", HolderId("trainer", "ray::MegatronTrainRayActor")),
        ("ray::MegatronTrainRayActor", HolderId("trainer", "ray::MegatronTrainRayActor")),
        ("ray::MegatronTrainRayActor.__init__", HolderId("trainer", "ray::MegatronTrainRayActor")),
        ("ray::PPO.train()", HolderId("ray", "ray::PPO")),
        ("ray::WorkerDict.actor_rollout_init_model", HolderId("ray", "ray::WorkerDict")),
        ("ray::IDLE", HolderId("ray", "ray::IDLE")),
        ("ray::train_fn", HolderId("ray", "ray::train_fn")),
        ("VLLM::EngineCore", HolderId("vllm", "VLLM::EngineCore")),
        ("VLLM::EngineCore_DP1", HolderId("vllm", "VLLM::EngineCore")),
        ("VLLM::Worker_DP0_PP0_TP0_EP0", HolderId("vllm", "VLLM::Worker")),
        ("VLLM::Worker_TP1", HolderId("vllm", "VLLM::Worker")),
        ("VLLM::APIServer_3", HolderId("vllm", "VLLM::APIServer")),
        ("sglang::scheduler_DP1_TP3", HolderId("sglang", "sglang::scheduler")),
        ("sglang::scheduler_PP0_TP3", HolderId("sglang", "sglang::scheduler")),
        ("sglang::scheduler", HolderId("sglang", "sglang::scheduler")),
        ("sglang::detokenizer", HolderId("sglang", "sglang::detokenizer")),
    ],
)
def test_titles_name_a_bounded_stable_holder(title, expected):
    assert classify_title(title) == expected


def test_only_a_title_leaves_the_command_line():
    assert title_from_cmdline(b"ray::MegatronTrainRayActor.train\0\0\0\0") == "ray::MegatronTrainRayActor.train"
    assert title_from_cmdline(b"python3\0-m\0sglang.launch_server\0--api-key\0secret\0") is None
    assert title_from_cmdline(b"ray::evil name; rm -rf /\0") == "ray::evil_name__rm_-rf__"
    assert len(title_from_cmdline(b"ray::" + b"x" * 5000)) == 96


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["/usr/bin/python3", "/opt/venv/bin/torchrun", "--nproc_per_node", "8", "pretrain_gpt.py"], "torchrun"),
        (["torchrun", "--nnodes", "2", "train.py"], "torchrun"),
        (["python", "-m", "torch.distributed.run", "train.py"], "torchrun"),
        (["python", "-m", "torch.distributed.launch", "train.py"], "torchrun"),
        (["/usr/bin/python3", "-u", "pretrain_gpt.py", "--num-layers", "96"], "megatron"),
        (["python", "examples/classes/pretrain_gpt.py"], "megatron"),
        (["python", "train.py"], None),
        ([], None),
    ],
)
def test_launchers_are_recognised_without_keeping_an_argument(argv, expected):
    assert launcher_of(argv) == expected


def test_a_title_wins_then_torchrun_then_the_outermost_megatron_then_comm():
    assert holder_of("ray::X.y", "python", [(5, "torchrun")]) == HolderId("ray", "ray::X")
    assert holder_of(None, "python3", [(9, "megatron"), (5, "torchrun")]) == HolderId("trainer", "torchrun-5")
    assert holder_of(None, "python3", [(9, "megatron"), (3, "megatron")]) == HolderId("trainer", "megatron-3")
    assert holder_of(None, "python3", []) == HolderId("process", "python3")


@pytest.mark.parametrize(
    "line, pod, container",
    [
        # cgroupfs driver, cgroup v1 (Datadog's pid_mapper fixture) and v2
        (f"11:memory:/kubepods/burstable/pod{UID}/{CID}", UID, CID),
        (f"0::/kubepods/burstable/pod{UID}/{CID}", UID, CID),
        (f"4:memory:/kubepods/pod{UID}/{CID}", UID, CID),  # Guaranteed: no QoS level
        # systemd driver, v2, containerd / CRI-O / docker
        (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/"
         f"cri-containerd-{CID}.scope", UID, CID),
        (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice/"
         f"crio-{CID}.scope", UID, CID),
        (f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/docker-{CID}.scope", UID, CID),
        # the runtime's monitor is not the container
        (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/"
         f"crio-conmon-{CID}.scope", UID, ""),
        # kind (kubelet --cgroup-root), Docker-in-Docker nesting, another cgroup namespace's relative path
        (f"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod"
         f"{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope", UID, CID),
        (f"14:name=systemd:/docker/{'b' * 64}/kubelet/kubepods/burstable/pod{UID}/{CID}", UID, CID),
        (f"0::../../../kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/"
         f"docker-{CID}.scope", UID, CID),
        # runc's unexpanded form on cgroup v1 + systemd: colons inside the path
        (f"9:cpuset:/kubepods-burstable-pod{UID.replace('-', '_')}.slice:cri-containerd:{CID}", UID, CID),
        # not Kubernetes
        (f"0::/system.slice/docker-{CID}.scope", "", CID),
        (f"0::/machine.slice/libpod-{CID}.scope/container", "", CID),
        ("0::/user.slice/user-1000.slice/session-3.scope", "", ""),
        ("0::/", "", ""),
    ],
)  # fmt: skip
def test_pod_and_container_from_every_runtimes_cgroup_path(line, pod, container):
    assert parse_pod_uid(line + "\n") == pod
    assert parse_container(line + "\n") == container


def _titled(title: str, holds: int = 1) -> subprocess.Popen:
    """A process that titles itself with the real setproctitle and waits (120 s at most)."""
    code = "import setproctitle, sys, time; setproctitle.setproctitle(sys.argv[1]); time.sleep(120)"
    return subprocess.Popen([sys.executable, "-c", code, title])


def _sglang_launch(port: int, tp: int) -> tuple[subprocess.Popen, list[int]]:
    """A real process whose command line is an SGLang launch, with titled scheduler children."""
    code = (
        "import sys, time; from fakenvml.tree import start; "
        "t = start(int(sys.argv[-1]), depth=1, max_seconds=120); print(*t.leaves, flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "-m", "sglang.launch_server", "--port", str(port), str(tp)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True,
    )  # fmt: skip
    return proc, [int(pid) for pid in proc.stdout.readline().split()]


def _torchrun(tmp_path: Path, ranks: int) -> tuple[subprocess.Popen, list[int]]:
    """`torchrun ... pretrain_gpt.py` as its command line looks: a launcher with untitled rank children."""
    script = tmp_path / "pretrain_gpt.py"
    script.write_text("import time\ntime.sleep(120)\n")
    launcher = tmp_path / "torchrun"
    launcher.write_text(
        f"#!{shebang_python()}\nimport subprocess, sys, time\n"
        "ranks = [subprocess.Popen([sys.executable, '-u', sys.argv[-1], '--num-layers', '96'])"
        " for _ in range(int(sys.argv[2]))]\n"
        "print(*[r.pid for r in ranks], flush=True)\ntime.sleep(120)\n"
    )
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    proc = subprocess.Popen([str(launcher), "--nproc_per_node", str(ranks), str(script)], stdout=subprocess.PIPE,
                            text=True, cwd=tmp_path, start_new_session=True)  # fmt: skip
    return proc, [int(pid) for pid in proc.stdout.readline().split()]


@pytest.fixture
def spawned():
    """Processes the test started, killed however it ends; a launcher in a session of its own takes
    its children (ranks, schedulers) with it, as they would otherwise outlive the test."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        kill_with_descendants(proc)


def test_a_miles_like_node_with_no_registry_names_every_gpu_process(
    exporter_factory, scenario, spawned, tmp_path, child_cgroup
):
    """Ray trainer actors hold most of each GPU, SGLang engines are discovered by their launch, a vLLM
    engine, torchrun ranks and one orphan: every GPU process gets a holder, and unattributed memory is
    only what NVML lists for no process."""
    scenario.gpus = [type(scenario.gpus[0])(index=i) for i in range(4)]
    trainers = [_titled("ray::MegatronTrainRayActor.train") for _ in range(4)]
    sglang, schedulers = _sglang_launch(31401, 2)
    vllm = _titled("VLLM::EngineCore")
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    torchrun, ranks = _torchrun(tmp_path, 2)
    spawned += [*trainers, sglang, vllm, orphan, torchrun]
    # The trainer actors run in a pod: a real cgroup whose path is kubelet's (cgroupfs driver).
    pod = child_cgroup(f"kubepods/burstable/pod{UID}/{CID}")
    for trainer in trainers:
        (pod / "cgroup.procs").write_text(str(trainer.pid))
    holdings = {0: [(trainers[0].pid, 60), (schedulers[0], 10)], 1: [(trainers[1].pid, 60), (schedulers[1], 10)],
                2: [(trainers[2].pid, 50), (vllm.pid, 20), (ranks[0], 3)],
                3: [(trainers[3].pid, 50), (orphan.pid, 1), (ranks[1], 3)]}  # fmt: skip
    for index, held in holdings.items():
        scenario.gpus[index].processes = [(pid, gib * GIB) for pid, gib in held]
        scenario.gpus[index].used = sum(gib for _, gib in held) * GIB + CONTEXT
    scenario.write()
    time.sleep(0.3)  # the launchers have exec'd and titled themselves

    exporter = exporter_factory(scenario, "--registry.dir", str(tmp_path / "none"))
    deadline = time.monotonic() + 15
    while not values(m := exporter.scrape(), "gpu_residency_engine_up", engine=f"sglang-31401-{sglang.pid}"):
        assert time.monotonic() < deadline, "discovery did not find the SGLang launch"
        time.sleep(0.2)

    processes = m["gpu_residency_process_memory_bytes"]
    assert len(processes) == 10
    assert all(labels["holder"] and labels["holder_kind"] not in ("", "unknown") for labels, _ in processes)
    by_pid = {int(labels["pid"]): labels for labels, _ in processes}
    for trainer in trainers:
        assert by_pid[trainer.pid]["holder"] == "ray::MegatronTrainRayActor"
        assert by_pid[trainer.pid]["holder_kind"] == "trainer" and by_pid[trainer.pid]["pod_uid"] == UID
        assert by_pid[trainer.pid]["container_id"] == CID
        assert by_pid[trainer.pid]["comm"] == "ray::MegatronTrainRayActor.train"
    assert {by_pid[pid]["holder"] for pid in schedulers} == {f"sglang-31401-{sglang.pid}"}, "the discovered engine"
    assert {by_pid[pid]["comm"] for pid in schedulers} == {"sglang::scheduler_TP0", "sglang::scheduler_TP1"}
    assert (by_pid[vllm.pid]["holder"], by_pid[vllm.pid]["holder_kind"]) == ("VLLM::EngineCore", "vllm")
    assert {by_pid[pid]["holder"] for pid in ranks} == {f"torchrun-{torchrun.pid}"}
    assert by_pid[orphan.pid]["holder_kind"] == "process" and by_pid[orphan.pid]["engine"] == ""
    for gpu in range(4):
        assert one(m, "gpu_residency_unattributed_memory_bytes", gpu=gpu) == CONTEXT
    assert one(m, "gpu_residency_holder_memory_bytes", gpu=0, holder="ray::MegatronTrainRayActor", kind="trainer",
               pod_uid=UID) == 60 * GIB  # fmt: skip
    assert one(m, "gpu_residency_holder_memory_bytes", gpu=2, holder=f"torchrun-{torchrun.pid}") == 3 * GIB
    trainer_total = sum(v for labels, v in m["gpu_residency_holder_memory_bytes"] if labels["kind"] == "trainer")
    assert trainer_total == (60 + 60 + 50 + 50 + 3 + 3) * GIB

    # A registration still wins over anything discovered or recognised.
    register_engine("rollout-0", root_pid=sglang.pid, kind="sglang", directory=tmp_path / "none")
    time.sleep(0.3)  # past --collection.min-interval
    m = exporter.scrape()
    assert one(m, "gpu_residency_process_memory_bytes", pid=schedulers[0], holder="rollout-0") == 10 * GIB


def test_the_gate_names_unregistered_holders(fake_nvml_dir, scenario, spawned, monkeypatch):
    import ctypes

    import fakenvml
    from gate.nvml_source import NvmlSource

    trainer = _titled("ray::MegatronTrainRayActor.train")
    spawned.append(trainer)
    time.sleep(0.3)
    monkeypatch.setenv("FAKE_NVML_SCENARIO", str(scenario.path))
    ctypes.CDLL(str(fake_nvml_dir / fakenvml.SONAME))
    scenario.gpus[1].processes = [(trainer.pid, int(9.4 * GIB))]
    scenario.gpus[1].used = int(9.5 * GIB)
    scenario.write()
    text = ResidualGate(2, source=NvmlSource()).check([1]).explain()
    assert f"trainer ray::MegatronTrainRayActor pid {trainer.pid}: 9.4 GiB" in text


def test_series_per_node_stay_bounded_with_64_ray_workers(exporter_factory, scenario, spawn_tree, tmp_path):
    scenario.gpus = [type(scenario.gpus[0])(index=i) for i in range(8)]
    workers = spawn_tree(leaves=64, depth=1, title="ray::RolloutWorker.generate")
    for rank, pid in enumerate(workers.leaves):
        scenario.gpus[rank % 8].processes.append((pid, GIB))
    for gpu in scenario.gpus:
        gpu.used = len(gpu.processes) * GIB + CONTEXT
    scenario.write()
    exporter = exporter_factory(scenario, "--registry.dir", str(tmp_path / "none"))
    text = exporter.scrape()
    series = sum(len(samples) for samples in text.values())
    holders = text["gpu_residency_holder_memory_bytes"]
    print(f"series per node at 8 GPUs with 64 Ray workers: {series} ({len(holders)} holder series)")
    assert {labels["holder"] for labels, _ in holders} == {"ray::RolloutWorker"}, "one name per actor class"
    assert len(holders) == 8 and len(text["gpu_residency_process_memory_bytes"]) == 64
    assert series < 64 + 8 * 8 + 60, series


def test_the_pod_panel_joins_with_kube_state_metrics(exporter_factory, prometheus_factory, scenario, spawned,
                                                      child_cgroup, tmp_path):  # fmt: skip
    """The README's join, as the dashboard panel writes it, against a real Prometheus scraping the
    exporter and a target exposing kube_pod_info as kube-state-metrics does."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from test_dashboards import DASHBOARDS, SAMPLE_VARIABLES

    trainer = _titled("ray::MegatronTrainRayActor.train")
    spawned.append(trainer)
    (child_cgroup(f"kubepods/burstable/pod{UID}/{CID}") / "cgroup.procs").write_text(str(trainer.pid))
    scenario.gpus[0].processes = [(trainer.pid, 7 * GIB)]
    scenario.gpus[0].used = 7 * GIB
    scenario.write()
    body = (
        "# HELP kube_pod_info Information about pod.\n# TYPE kube_pod_info gauge\n"
        f'kube_pod_info{{namespace="rl",pod="trainer-0",uid="{UID}",node="test-node",created_by_kind="Job"}} 1\n'
    ).encode()

    class KubeStateMetrics(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ksm = ThreadingHTTPServer(("127.0.0.1", 0), KubeStateMetrics)
    threading.Thread(target=ksm.serve_forever, daemon=True).start()
    try:
        exporter = exporter_factory(scenario, "--registry.dir", str(tmp_path / "none"))
        prometheus = prometheus_factory([exporter.url.removeprefix("http://"), f"127.0.0.1:{ksm.server_address[1]}"])
        panel = next(p for p in json.loads((DASHBOARDS / "gpu-residency.json").read_text())["panels"]
                     if p["title"] == "Memory per Kubernetes pod")  # fmt: skip
        expr = panel["targets"][0]["expr"]
        for name, value in SAMPLE_VARIABLES.items():
            expr = expr.replace(name, value)
        (series,) = prometheus.wait_for(expr)
        assert series["metric"] == {"namespace": "rl", "pod": "trainer-0"} and float(series["value"][1]) == 7 * GIB
    finally:
        ksm.shutdown()
        ksm.server_close()
