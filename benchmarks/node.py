"""A simulated node for benchmarks: N fake GPUs, M engines as real process trees, and enough
idle host processes to reach a target process count (HostProcesses)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import fakenvml
from exporter.proctable import scan_pids
from exporter.registry import register_engine

ROOT = Path(__file__).resolve().parent.parent


class SimulatedNode:
    def __init__(self, gpus: int, engines: int) -> None:
        self.gpus, self.engines = gpus, engines
        self.workdir = Path(tempfile.mkdtemp(prefix="gpu-residency-bench-"))
        self.registry = self.workdir / "engines"
        self.lib_dir = fakenvml.build()
        self.scenario = fakenvml.Scenario.with_gpus(self.workdir / "scenario.json", gpus)
        self._children: list[subprocess.Popen] = []

    def __enter__(self) -> SimulatedNode:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for index in range(self.engines):
            leaves = max(1, self.gpus // self.engines)
            command = [sys.executable, "-m", "fakenvml.tree", "--leaves", str(leaves), "--max-seconds", "900"]
            tree = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
            self._children.append(tree)
            register_engine(f"engine-{index}", root_pid=tree.pid, directory=self.registry)
            for rank in range(leaves):
                pid = int(tree.stdout.readline())
                self.scenario.gpus[(index * leaves + rank) % self.gpus].processes.append((pid, 10 * fakenvml.GIB))
        for gpu in self.scenario.gpus:
            gpu.used = sum(used for _, used in gpu.processes) + fakenvml.GIB
        self.scenario.write()
        return self

    def __exit__(self, *exc: object) -> None:
        for child in self._children:
            child.terminate()
        for child in self._children:
            child.wait()

    def environ(self) -> dict[str, str]:
        """For an exporter in a child process: the fake NVML and this node's scenario."""
        env = self.scenario.environ(self.lib_dir)
        env["PYTHONPATH"] = str(ROOT)
        return env


class HostProcesses:
    """Idle processes (sleep) until the host has `total` processes: the /proc a scan must read."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._sleepers: list[subprocess.Popen] = []

    def __enter__(self) -> HostProcesses:
        for _ in range(max(0, self.total - len(scan_pids()))):
            self._sleepers.append(subprocess.Popen(["sleep", "900"]))
        return self

    def __exit__(self, *exc: object) -> None:
        for sleeper in self._sleepers:
            sleeper.kill()
        for sleeper in self._sleepers:
            sleeper.wait()
