"""Holders on a real Ray node (Ray 2.60 from PyPI, a local ray.init): actors, a task, an actor's
spawned child and Ray's own processes on fake GPUs are named by the exporter and the gate as the
README's holders table says, and a pooled worker is `ray::IDLE` once its task is done."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, kill_with_descendants, scrape_until, values, visible_devices

from fakenvml import GIB
from gate import ResidualGate
from gate.exporter_source import ExporterSource

# The framework: a trainer actor (busy in a method) with a spawned child, an idle rollout actor,
# a running task; prints their PIDs and Ray's own (raylet, its agents), then waits to be told.
DRIVER = r"""
import json, multiprocessing, os, signal, sys, tempfile, threading, time
import ray

go = sys.argv[1]
threading.Timer(240, lambda: os._exit(3)).start()  # a deadline of its own, whatever the test does
signal.signal(signal.SIGTERM, lambda *_: (ray.shutdown(), os._exit(0)))
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
         _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))

def wait_for(name, limit=200.0):
    deadline = time.monotonic() + limit
    while not os.path.exists(os.path.join(go, name)) and time.monotonic() < deadline:
        time.sleep(0.05)

@ray.remote(num_cpus=0)
class MegatronTrainRayActor:
    def start(self):
        self.child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(200,), daemon=True)
        self.child.start()
        return os.getpid(), self.child.pid
    def train(self):
        wait_for("end")

@ray.remote(num_cpus=0)
class RolloutWorker:
    def pid(self):
        return os.getpid()

@ray.remote(num_cpus=1)
def generate():
    with open(os.path.join(go, "task.pid"), "w") as handle:
        handle.write(str(os.getpid()))
    wait_for("task")

def parent(pid):
    stat = open(f"/proc/{pid}/stat").read()
    return int(stat[stat.rfind(")") + 2:].split()[1])

trainer = MegatronTrainRayActor.remote()
trainer_pid, child_pid = ray.get(trainer.start.remote())
training = trainer.train.remote()
rollout = RolloutWorker.remote()
rollout_pid = ray.get(rollout.pid.remote())
task = generate.remote()
wait_for("task.pid")
raylet = parent(trainer_pid)
def title(pid):
    return open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0", 1)[0]

agents = []  # Ray's own agents, children of the raylet titled ray::*Agent
for p in filter(str.isdigit, os.listdir("/proc")):
    try:
        if parent(int(p)) == raylet and title(p).startswith(b"ray::") and title(p).endswith(b"Agent"):
            agents.append(int(p))
    except OSError:
        pass
pids = dict(trainer=trainer_pid, child=child_pid, rollout=rollout_pid, raylet=raylet, agent=agents[0],
            task=int(open(os.path.join(go, "task.pid")).read()))
print(json.dumps(pids), flush=True)
ray.get(task)
print("task done", flush=True)
wait_for("end")
ray.shutdown()
"""


def _title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()


@pytest.fixture
def ray_node(tmp_path):
    """The framework on a real local Ray, stopped (SIGTERM: ray.shutdown) with everything it started."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        pytest.fail("ray is a test dependency: pip install -e '.[test]'")
    go = tmp_path / "go"
    go.mkdir()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))  # no token written to the home
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(go)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = driver.stdout.readline()
        if not line:
            pytest.fail("the Ray driver did not start")
        yield driver, go, json.loads(line)
    finally:
        (go / "task").touch()
        (go / "end").touch()
        driver.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            driver.wait(timeout=30)
        kill_with_descendants(driver)


def _holders(metrics: dict, pid: int) -> tuple[str, str]:
    ((labels, _),) = [s for s in metrics["gpu_residency_process_memory_bytes"] if s[0]["pid"] == str(pid)]
    return labels["holder"], labels["holder_kind"]


def test_ray_actors_tasks_children_and_rays_own_processes_are_named(
    ray_node, exporter_factory, scenario, fake_nvml_dir, tmp_path, monkeypatch
):
    driver, go, pids = ray_node
    assert _title(pids["trainer"]) == "ray::MegatronTrainRayActor.train"
    assert _title(pids["rollout"]) == "ray::RolloutWorker" and _title(pids["task"]) == "ray::generate"
    scenario.gpus[0].processes = [(pids["trainer"], 20 * GIB), (pids["child"], GIB)]
    scenario.gpus[1].processes = [(pids["rollout"], 8 * GIB), (pids["task"], 2 * GIB),
                                  (pids["raylet"], GIB // 4), (pids["agent"], GIB // 8)]  # fmt: skip
    scenario.gpus[0].used, scenario.gpus[1].used = 21 * GIB, 11 * GIB
    scenario.write()
    exporter = exporter_factory(scenario, "--registry.dir", str(tmp_path / "reg"), "--no-engines.discover")
    m = scrape_until(exporter, lambda m: len(m.get("gpu_residency_process_memory_bytes", [])) == 6)
    child_comm = Path(f"/proc/{pids['child']}/comm").read_text().strip()
    expected = {
        "trainer": ("ray::MegatronTrainRayActor", "trainer"),  # by its class, whatever method runs
        "rollout": ("ray::RolloutWorker", "ray"),
        "task": ("ray::generate", "ray"),
        "child": (child_comm, "process"),  # a spawn child is a plain python: named by its comm
        "raylet": ("raylet", "process"),
        "agent": (_title(pids["agent"]), "ray"),  # ray::DashboardAgent / ray::RuntimeEnvAgent
    }
    assert {who: _holders(m, pids[who]) for who in expected} == expected

    # The gate names them the same way, from the exporter and from its own NVML.
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", visible_devices(scenario))
    explained = ResidualGate(2, source=ExporterSource(exporter.url)).check([0]).explain()
    assert f"trainer ray::MegatronTrainRayActor pid {pids['trainer']}: 20.0 GiB" in explained, explained
    env = dict(scenario.environ(fake_nvml_dir), PYTHONPATH=str(ROOT))
    local = subprocess.run([sys.executable, "-m", "gate", "check", "--source", "nvml", "--gpus", "0"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False)  # fmt: skip
    assert f"trainer ray::MegatronTrainRayActor pid {pids['trainer']}: 20.0 GiB" in local.stdout, local.stdout

    # The task ends; Ray keeps its worker in the pool, retitled ray::IDLE: memory the task left
    # behind is held by ray::IDLE (same PID), which is what a holder panel then shows.
    (go / "task").touch()
    assert driver.stdout.readline().strip() == "task done"
    deadline = time.monotonic() + 30
    while _title(pids["task"]) != "ray::IDLE":
        assert time.monotonic() < deadline, _title(pids["task"])
        time.sleep(0.1)
    m = scrape_until(exporter, lambda m: values(m, "gpu_residency_process_memory_bytes", holder="ray::IDLE"))
    assert _holders(m, pids["task"]) == ("ray::IDLE", "ray")
