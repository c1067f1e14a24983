"""`--demo`: a simulated colocated-RL node, so the exporter shows real output without a GPU.

Eight fake GPUs (the fake NVML), three SGLang-like engines at TP=2 (each with a fake
SGLang /server_info) and one vLLM engine at TP=2 (a fake `vllm serve` 0.33.0 whose
`VLLM::EngineCore` has two `VLLM::Worker_TP<i>` children, put to sleep and woken over HTTP as
verl does, and which reports its own sleep state), registered in a private registry with the
states their framework sets, and a trainer that nobody registers: Ray actor processes titled
`ray::MegatronTrainRayActor.train` (with the real setproctitle, as Ray does), which the
exporter names from their titles, as on a miles node. Each is a real process whose memory
the fake NVML reports; one more engine is killed by SIGKILL at start, so the exit counters
have something to show, and a leftover process holds memory in no engine. The engines and
the trainer take turns every PHASE_SECONDS, as in colocated RL training: engines awake and
the trainer offloaded, then engines asleep and the trainer awake. A ninth card has MIG on, with
three 1g.10gb devices: the leftover process holds memory on one, another holds memory no listed
process accounts for (as when a vGPU setup hides its processes), the third is idle.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import fakenvml
from exporter.engines.registry import register_engine, set_engine_state
from exporter.exits.report import report_exit
from fakenvml import GIB, FakeMig, Scenario
from fakenvml.prometheus import free_port
from fakenvml.sglang import FakeSglang
from fakenvml.tree import Tree
from fakenvml.tree import start as start_tree
from fakenvml.vllm_serve import VllmProcess, console_script
from fakenvml.vllm_serve import launch as launch_vllm

log = logging.getLogger(__name__)

PHASE_SECONDS = 20.0
FIRST_PHASE_SECONDS = 4.0  # the first sleep comes soon, so release timings show up early
RELEASE_SECONDS = 1.5  # between a state change and the memory actually moving
GPUS = 8
TP = 2
CONTEXT_BYTES = int(0.3 * GIB)  # driver/context memory no process is charged for
TRAINER_TITLE = "ray::MegatronTrainRayActor.train"
VLLM_ENGINE = "rollout-vllm"
VLLM_SLEEP_LEVEL = 1


class DemoNode:
    def __init__(self, workdir: Path, lib_dir: Path) -> None:
        self.workdir = workdir
        self.lib_dir = lib_dir
        self.registry = workdir / "engines"
        self.scenario = Scenario.with_gpus(workdir / "scenario.json", GPUS + 1)
        self.scenario.gpus[GPUS].mig_mode = 1  # the MIG card: devices set in _move_memory
        self.engines: list[tuple[str, Tree]] = []
        self.trainer: Tree | None = None
        self.servers: list[FakeSglang] = []
        self.vllm: VllmProcess | None = None
        self.orphan: Tree | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._cycle, name="demo", daemon=True)

    @classmethod
    def start(cls) -> DemoNode:
        try:
            lib_dir = fakenvml.build()
        except fakenvml.BuildError as exc:
            raise SystemExit(f"gpu-residency-exporter: --demo needs the fake NVML: {exc}") from None
        node = cls(Path(tempfile.mkdtemp(prefix="gpu-residency-demo-")), lib_dir)
        atexit.register(node.stop)
        for engine in range(GPUS // TP - 1):
            name, tree = f"rollout-{engine}", start_tree(TP)
            server = FakeSglang("new", dp_size=1, lifetime=None)
            node.servers.append(server)
            register_engine(
                name,
                root_pid=tree.pid,
                kind="sglang",
                url=server.url,
                directory=node.registry,
                state="active",
            )
            node.engines.append((name, tree))
        node.vllm = launch_vllm(
            ["Qwen/Qwen3-8B", "--port", str(free_port()), "--tensor-parallel-size", str(TP), "--enable-sleep-mode",
             "--fake-version", "0.33.0", "--fake-lifetime", "86400"],
            script=console_script(node.workdir / "bin"),
        )  # fmt: skip
        register_engine(
            VLLM_ENGINE, root_pid=node.vllm.pid, kind="vllm", url=node.vllm.url, directory=node.registry, state="active"
        )
        node.orphan = start_tree(1, title="python")  # a leftover process in no engine
        node.trainer = start_tree(GPUS, depth=1, title=TRAINER_TITLE)  # Ray actors: named, never registered
        node._crash_one_engine()
        node._move_memory(engines_awake=True)
        node._thread.start()
        where = (node.scenario.path, node.registry)
        log.info("demo node: %d fake GPUs and a MIG card, scenario %s, registry %s", GPUS, *where)
        return node

    def _crash_one_engine(self) -> None:
        """A real child killed by SIGKILL, reported by its parent (us): the exits panel has data."""
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
        code = child.wait()
        report_exit("rollout-warmup", code, elapsed=time.monotonic() - started, directory=self.registry)

    def apply(self, args: argparse.Namespace) -> None:
        """Point the exporter at the simulated node."""
        os.environ["FAKE_NVML_SCENARIO"] = str(self.scenario.path)
        args.nvml_library = str(self.lib_dir / fakenvml.SONAME)
        args.registry_dir = str(self.registry)
        args.state_dir = str(self.workdir / "state")  # never the machine's /var/lib/gpu-residency

    def _set_states(self, engines_awake: bool) -> None:
        """What a framework does: SGLang's /release_memory_occupation (or resume) is the framework's own
        business here, it records the state once the call returned; vLLM's /sleep and /wake_up are
        called for real (the engine reports its state itself), then the state recorded as well."""
        for name, _ in self.engines:
            set_engine_state(name, "active" if engines_awake else "asleep", self.registry)
        route = "/wake_up" if engines_awake else f"/sleep?level={VLLM_SLEEP_LEVEL}"
        try:
            urllib.request.urlopen(urllib.request.Request(self.vllm.url + route, method="POST"), timeout=5).close()
        except OSError as exc:
            log.warning("demo: vLLM %s failed: %s", route, exc)
        set_engine_state(VLLM_ENGINE, "active" if engines_awake else "asleep", self.registry)

    def _move_memory(self, engines_awake: bool) -> None:
        engine_bytes = 62 * GIB if engines_awake else int(1.7 * GIB)
        trainer_bytes = 3 * GIB if engines_awake else 68 * GIB
        for gpu in self.scenario.gpus:
            gpu.processes = []
        for engine_index, (_, tree) in enumerate(self.engines):
            for rank, pid in enumerate(tree.leaves):
                self.scenario.gpus[engine_index * TP + rank].processes.append((pid, engine_bytes))
        vllm_bytes = 60 * GIB if engines_awake else GIB  # what vLLM logs as "still in use": the CUDA context, graphs
        for rank, pid in enumerate(self.vllm.workers):
            self.scenario.gpus[len(self.engines) * TP + rank].processes.append((pid, vllm_bytes))
        for index, pid in enumerate(self.trainer.leaves):
            self.scenario.gpus[index].processes.append((pid, trainer_bytes))
        orphan = FakeMig(gi=1, used=int(1.2 * GIB) + CONTEXT_BYTES, processes=[(self.orphan.leaves[0], int(1.2 * GIB))])
        self.scenario.gpus[GPUS].mig = [orphan, FakeMig(gi=2, used=3 * GIB), FakeMig(gi=3)]
        for gpu in self.scenario.gpus:
            gpu.used = sum(used for _, used in gpu.processes) + CONTEXT_BYTES + sum(m.used for m in gpu.mig)
        self.scenario.write()

    def _cycle(self) -> None:
        awake = True
        delay = FIRST_PHASE_SECONDS
        while not self._stop.wait(delay):
            delay = PHASE_SECONDS
            awake = not awake
            self._set_states(engines_awake=awake)
            if self._stop.wait(RELEASE_SECONDS):  # the driver frees (and maps) memory a moment later
                return
            self._move_memory(engines_awake=awake)

    def stop(self) -> None:
        self._stop.set()
        for server in self.servers:
            server.stop()
        self.servers.clear()
        if self.vllm is not None:
            self.vllm.stop()
        for tree in [*(t for _, t in self.engines), *(t for t in (self.trainer, self.orphan) if t)]:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                tree.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
