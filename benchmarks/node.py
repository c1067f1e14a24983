"""A simulated node for benchmarks: N fake GPUs, M engines as real process trees, and enough
idle host processes to reach a target process count (HostProcesses)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import fakenvml
from exporter.registry import register_engine
from exporter.sources.proctable import scan_pids
from fakenvml.tree import Tree
from fakenvml.tree import start as start_tree

ROOT = Path(__file__).resolve().parent.parent


class SimulatedNode:
    def __init__(self, gpus: int, engines: int) -> None:
        self.gpus, self.engines = gpus, engines
        self.workdir = Path(tempfile.mkdtemp(prefix="gpu-residency-bench-"))
        self.registry = self.workdir / "engines"
        self.lib_dir = fakenvml.build()
        self.scenario = fakenvml.Scenario.with_gpus(self.workdir / "scenario.json", gpus)
        self._trees: list[Tree] = []

    def __enter__(self) -> SimulatedNode:
        for index in range(self.engines):
            leaves = max(1, self.gpus // self.engines)
            tree = start_tree(leaves, max_seconds=900)
            self._trees.append(tree)
            register_engine(f"engine-{index}", root_pid=tree.pid, directory=self.registry)
            for rank, pid in enumerate(tree.leaves):
                self.scenario.gpus[(index * leaves + rank) % self.gpus].processes.append((pid, 10 * fakenvml.GIB))
        for gpu in self.scenario.gpus:
            gpu.used = sum(used for _, used in gpu.processes) + fakenvml.GIB
        self.scenario.write()
        return self

    def __exit__(self, *exc: object) -> None:
        for tree in self._trees:
            tree.stop()

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
