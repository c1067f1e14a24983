"""The gate never says "clear" while the card is held (issue 33): one physical card whatever view
names it, the freshest of several readings, a clear streak that really holds, engines named on
every source."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, kill_with_descendants

import fakenvml
from fakenvml import GIB, FakeGpu, Scenario
from fakenvml.smi import install as install_smi
from gate import GateTimeout, GpuSample, ResidualGate, probe_max_used_gpu_mem_gb

POD_CARDS = (6, 4, 7, 5)  # the device plugin's order is not the cards' bus order


@pytest.fixture
def node(tmp_path, exporter_factory, prometheus_factory):
    """A host of 8 GPUs: card 0 nearly empty (1 GiB), card 4 held (30 GiB), card 5 at 0.5 GiB; its
    exporter, and a Prometheus scraping it. `pod` is the view of a pod given cards 4-7."""
    host = Scenario.with_gpus(tmp_path / "host.json", 8)
    host.gpus[0].used, host.gpus[4].used, host.gpus[5].used = GIB, 30 * GIB, GIB // 2
    host.write()
    exporter = exporter_factory(host, "--registry.dir", str(tmp_path / "reg"), "--no-engines.discover")
    prometheus = prometheus_factory([exporter.url.removeprefix("http://")])
    prometheus.wait_for('gpu_residency_memory_used_bytes{gpu="4"}')
    pod = Scenario(tmp_path / "pod.json", [FakeGpu(index=i, card=4 + i, used=host.gpus[4 + i].used) for i in range(4)])
    pod.write()
    return host, pod, exporter, prometheus


def pod_env(pod: Scenario, fake_nvml_dir: Path, tmp_path: Path, *, nvml=True, smi=True, visible=True) -> dict:
    """The environment of a framework in that pod: its NVML, its nvidia-smi, its $NVIDIA_VISIBLE_DEVICES
    (each can be left out, to show the gate reading its view from the others)."""
    env = pod.environ(fake_nvml_dir) if nvml else {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["PYTHONPATH"] = str(ROOT)
    env.pop("NVIDIA_VISIBLE_DEVICES", None)
    if visible:
        env["NVIDIA_VISIBLE_DEVICES"] = ",".join(FakeGpu(index=card).uuid for card in POD_CARDS)
    bin_dir = tmp_path / "pod-bin"
    if smi:
        install_smi(bin_dir, fake_nvml_dir / fakenvml.SONAME, pod.path)
    env["PATH"] = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    return env


def gate_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gate", "check", "--threshold-gb", "2", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip


def test_every_source_judges_the_pods_gpu_0_as_host_card_4(node, fake_nvml_dir, tmp_path):
    _, pod, exporter, prometheus = node
    env = pod_env(pod, fake_nvml_dir, tmp_path)
    sources = {
        "exporter": ["--exporter-url", exporter.url],
        "prometheus": ["--prometheus-url", prometheus.url, "--node", "test-node"],
        "nvml": [],
        "nvidia-smi": [],
    }
    for source, extra in sources.items():
        held = gate_cli(env, "--source", source, "--gpus", "0", *extra)
        assert held.returncode == 1 and "30.00 GiB used" in held.stdout, (source, held.stdout, held.stderr)
        free = gate_cli(env, "--source", source, "--gpus", "1", *extra)
        assert free.returncode == 0 and "0.50 GiB used" in free.stdout, (source, free.stdout, free.stderr)


@pytest.mark.parametrize(
    "view", [{"nvml": False, "smi": False}, {"nvml": False, "visible": False}, {"smi": False, "visible": False}]
)
def test_any_one_view_of_the_pods_gpus_resolves_an_index_for_the_exporter(node, fake_nvml_dir, tmp_path, view):
    """$NVIDIA_VISIBLE_DEVICES alone, nvidia-smi -L alone, NVML alone: each gives the same card."""
    _, pod, exporter, _ = node
    held = gate_cli(pod_env(pod, fake_nvml_dir, tmp_path, **view), "--exporter-url", exporter.url, "--gpus", "0")
    assert held.returncode == 1 and "30.00 GiB used" in held.stdout, held.stdout + held.stderr


def test_host_indices_in_nvidia_visible_devices_are_a_view_too(node, tmp_path, fake_nvml_dir):
    _, pod, exporter, _ = node
    env = pod_env(pod, fake_nvml_dir, tmp_path, nvml=False, smi=False, visible=False)
    env["NVIDIA_VISIBLE_DEVICES"] = "5,4,6,7"
    assert gate_cli(env, "--exporter-url", exporter.url, "--gpus", "0").returncode == 1
    assert gate_cli(env, "--exporter-url", exporter.url, "--gpus", "1").returncode == 0


def test_an_index_with_no_view_is_refused_with_how_to_name_the_gpu(node, tmp_path, fake_nvml_dir):
    _, pod, exporter, _ = node
    env = pod_env(pod, fake_nvml_dir, tmp_path, nvml=False, smi=False, visible=False)
    env["NVIDIA_VISIBLE_DEVICES"] = "all"  # what base images set: proves nothing about this pod
    refused = gate_cli(env, "--exporter-url", exporter.url, "--gpus", "0")
    assert refused.returncode == 2 and "by UUID (GPU-" in refused.stderr, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
    by_uuid = gate_cli(env, "--exporter-url", exporter.url, "--gpus", FakeGpu(index=4).uuid)
    assert by_uuid.returncode == 1 and "30.00 GiB used" in by_uuid.stdout


def test_the_library_and_the_rlix_probe_judge_the_same_card(node, monkeypatch):
    _, _, exporter, prometheus = node
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", ",".join(FakeGpu(index=card).uuid for card in POD_CARDS))
    monkeypatch.setenv("GPU_RESIDENCY_EXPORTER_URL", exporter.url)
    assert probe_max_used_gpu_mem_gb([0]) == pytest.approx(30.0)
    assert probe_max_used_gpu_mem_gb([1, 2]) == pytest.approx(0.5)
    gate = ResidualGate.from_env(threshold_gb=2)
    assert not gate.check([0]).ok and gate.check([1]).ok
    on_prometheus = ResidualGate(2, source="prometheus", prometheus_url=prometheus.url)
    decision = on_prometheus.check([0], node="a pod's host name, not the node's")  # asked by UUID
    assert not decision.ok and decision.gpus[0].sample.uuid == FakeGpu(index=4).uuid
    # A process with no view of its GPUs (no NVML, no nvidia-smi, NVIDIA_VISIBLE_DEVICES=all): its own
    # interpreter, since this one may have loaded an NVML for another test.
    blind = dict(os.environ, NVIDIA_VISIBLE_DEVICES="all", PATH="/nonexistent", PYTHONPATH=str(ROOT))
    blind.pop("LD_LIBRARY_PATH", None)
    code = (
        "from gate import probe_max_used_gpu_mem_gb, ResidualGate, GateConfigError\n"
        "from gate.exporter_source import ExporterSource\n"
        "print(probe_max_used_gpu_mem_gb([0]))\n"
        "try:\n    ResidualGate(2, source=ExporterSource(__import__('sys').argv[1])).check([0])\n"
        "except GateConfigError as exc:\n    print('refused:', exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, exporter.url], capture_output=True, text=True, env=blind,
                            cwd=ROOT, timeout=60, check=False)  # fmt: skip
    probed, refused = result.stdout.splitlines()
    assert probed == "None", "cannot resolve: cannot measure, never the exporter's GPU 0"
    assert refused.startswith("refused:") and "by UUID" in refused, refused
    assert "GPU 0 is an index" in result.stderr, "the probe warns why it cannot measure"


# ---------- the clear streak ----------


class Clear:
    """A source whose GPU is always clear; records when it was looked at."""

    name = "clear"

    def __init__(self) -> None:
        self.looks: list[float] = []

    def read(self, node: str) -> list[GpuSample]:
        self.looks.append(time.monotonic())
        return [GpuSample(0, "GPU-0", "00000000:18:00.0", 0)]


def test_clear_samples_are_looks_poll_s_apart_whatever_the_timeout():
    source = Clear()
    gate = ResidualGate(2, source=source, clear_samples=3, poll_s=0.5)
    started = time.monotonic()
    with pytest.raises(GateTimeout, match=r"clear on 2 of the 3 looks 0\.5s apart"):
        gate.wait([0], timeout=0.6)
    assert len(source.looks) == 2 and time.monotonic() - started < 1.0, "it never took a look to fill the streak"
    source.looks.clear()
    decision = gate.wait([0], timeout=10)
    assert decision.ok and len(source.looks) == 3
    gaps = [b - a for a, b in zip(source.looks, source.looks[1:], strict=False)]
    assert min(gaps) >= 0.5, gaps


def test_cli_wait_with_a_streak_longer_than_its_timeout_exits_1(node, fake_nvml_dir, tmp_path):
    _, pod, _, _ = node
    env = pod_env(pod, fake_nvml_dir, tmp_path)
    args = ["wait", "--source", "nvml", "--gpus", "1", "--clear-samples", "3", "--poll", "0.5"]
    short = subprocess.run([sys.executable, "-m", "gate", *args, "--timeout", "0.6"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False)  # fmt: skip
    assert short.returncode == 1 and "clear on" in short.stderr + short.stdout, short.stdout + short.stderr
    started = time.monotonic()
    enough = subprocess.run([sys.executable, "-m", "gate", *args, "--timeout", "20"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False)  # fmt: skip
    assert enough.returncode == 0 and time.monotonic() - started >= 1.0, enough.stdout + enough.stderr


# ---------- several readings of one card ----------


def test_a_dead_replicas_stale_copy_never_clears_a_held_card(exporter_factory, prometheus_factory, scenario, tmp_path):
    """Two Prometheus agents (an HA pair, replica r1 and r2) remote-write one exporter to a central
    store. r2 is killed while the card is at 0.5 GiB; the card then fills to 40 GiB. The store
    keeps r2's last value (no staleness marker over remote_write) beside r1's fresh one."""
    uuid = scenario.gpus[0].uuid
    scenario.gpus[0].used = GIB // 2
    scenario.write()
    exporter = exporter_factory(scenario, "--registry.dir", str(tmp_path / "reg"), "--no-engines.discover")
    central = prometheus_factory([], receiver=True)
    agents = {
        replica: prometheus_factory(
            [exporter.url.removeprefix("http://")],
            agent=True,
            remote_write=central.url + "/api/v1/write",
            external_labels={"cluster": "a", "replica": replica},
        )
        for replica in ("r1", "r2")
    }
    central.wait_for(f'count(gpu_residency_memory_used_bytes{{uuid="{uuid}"}}) == 2', timeout=60)
    gate = ResidualGate(2, source="prometheus", prometheus_url=central.url, max_age_s=60)
    assert gate.check([uuid]).ok, "two fresh copies that agree"

    kill_with_descendants(agents["r2"].proc)  # Prometheus itself, not only the timeout(1) that bounds its life
    scenario.gpus[0].used = 40 * GIB
    scenario.write()
    central.wait_for(f'gpu_residency_memory_used_bytes{{uuid="{uuid}",replica="r1"}} > {30 * GIB}', timeout=60)
    stale = central.query(f'gpu_residency_memory_used_bytes{{uuid="{uuid}",replica="r2"}}')
    assert float(stale[0]["value"][1]) == GIB // 2, "the dead replica's copy is still there to mislead"

    decision = gate.check([uuid])
    assert not decision.ok
    verdict = decision.gpus[0]
    assert verdict.sample.used_bytes == 40 * GIB and verdict.sample.origin == (("replica", "r1"),), "the freshest"
    assert "replica=r1: 40.00 GiB" in verdict.reason and "replica=r2: 0.50 GiB" in verdict.reason, verdict.reason
    cli = subprocess.run(
        [sys.executable, "-m", "gate", "check", "--source", "prometheus", "--prometheus-url", central.url,
         "--gpus", uuid, "--threshold-gb", "2", "--max-age", "60"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert cli.returncode == 1 and "replica=r2" in cli.stdout, cli.stdout + cli.stderr

    # With a bound under r2's age, its copy is stale: the fresh one alone decides.
    bounded = ResidualGate(2, source="prometheus", prometheus_url=central.url, max_age_s=3)
    deadline = time.monotonic() + 30
    while "ambiguous" in (verdict := bounded.check([uuid]).gpus[0]).reason:
        assert time.monotonic() < deadline, verdict.reason
        time.sleep(0.2)
    assert verdict.reason == "over threshold" and verdict.sample.origin == (("replica", "r1"),)


# ---------- engines on every source ----------


def test_nvml_and_nvidia_smi_sources_name_a_registered_engine_or_say_they_cannot_tell(
    fake_nvml_dir, scenario, spawn_tree, tmp_path, monkeypatch
):
    from exporter.registry import register_engine

    tree = spawn_tree(leaves=1)
    registry = tmp_path / "reg"
    register_engine("rollout-0", root_pid=tree.pid, directory=registry)
    scenario.gpus[0].processes = [(tree.leaves[0], 5 * GIB)]
    scenario.gpus[0].used = 6 * GIB
    scenario.write()
    env = dict(scenario.environ(fake_nvml_dir), PYTHONPATH=str(ROOT), GPU_RESIDENCY_REGISTRY=str(registry))
    smi = install_smi(tmp_path / "bin", fake_nvml_dir / fakenvml.SONAME, scenario.path)  # runs without our env
    env["PATH"] = os.pathsep.join([str(smi.parent), env["PATH"]])
    for source in ("nvml", "nvidia-smi"):
        held = gate_cli(env, "--source", source, "--gpus", "0", "--waiting-for", "rollout-0")
        expected = f"rollout-0 still holds 5.0 GiB on GPU 0 (pid {tree.leaves[0]} sglang::scheduler_TP0)"
        assert held.returncode == 1 and expected in held.stdout, (source, held.stdout, held.stderr)
        assert "engine rollout-0: 5.0 GiB" in held.stdout, "top holders name the engine, not an anonymous python"
    # The library, in-process: the nvidia-smi source runs the same tool and reads the same registry.
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("GPU_RESIDENCY_REGISTRY", str(registry))
    decision = ResidualGate(2, source="nvidia-smi").check([0], waiting_for="rollout-0")
    assert expected in decision.explain(), decision.explain()

    scenario.gpus[0].errors = {"processes": fakenvml.NOT_SUPPORTED}  # the process lists cannot be read
    scenario.write()
    for source in ("nvml", "nvidia-smi"):
        blind = gate_cli(env, "--source", source, "--gpus", "0", "--waiting-for", "rollout-0")
        assert blind.returncode == 1 and "cannot tell what it holds on GPU 0" in blind.stdout, (source, blind.stdout)
        assert "holds nothing" not in blind.stdout


def test_a_fresher_clear_copy_wins_only_once_the_held_copy_is_stale():
    """The freshest reading decides unless another within the staleness bound says otherwise; then the
    card is blocked and carries the highest figure (the RLix probe's max errs towards held)."""
    from gate.verdicts import verdict

    live = GpuSample(0, "GPU-a", "00000000:18:00.0", GIB // 2, age_seconds=1.0, origin=(("replica", "r1"),))
    dead = GpuSample(0, "GPU-a", "00000000:18:00.0", 40 * GIB, age_seconds=10.0, origin=(("replica", "r2"),))
    for samples in ([live, dead], [dead, live]):  # whatever order the store answers in
        held = verdict("0", "GPU-a", samples, 2 * GIB, max_age_s=15)
        assert not held.clear and held.sample is dead and "replica=r2: 40.00 GiB, 10.0s old" in held.reason
        fresh = verdict("0", "GPU-a", samples, 2 * GIB, max_age_s=5)
        assert fresh.clear and fresh.sample is live
    assert verdict("0", "GPU-a", [dead, live], 100 * GIB, max_age_s=15).clear, "copies that agree are no ambiguity"
