"""Starting an exporter under test and waiting for its first answer: what the CPU comparison
(benchmarks/run.py) and the gate's reaction time (benchmarks/reaction.py) both serve from."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests

import fakenvml
from benchmarks.node import SimulatedNode
from fakenvml.prometheus import free_port


@dataclass
class Served:
    name: str
    proc: subprocess.Popen
    url: str

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def serve(
    name: str, command: list[str], env: dict[str, str], port: int, preexec: Callable[[], None] | None = None
) -> Served:
    """`preexec`: run in the child before exec (joining a cgroup that counts its CPU)."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=preexec)
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return Served(name, proc, url)
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{name} did not start: {command}")


def serve_ours(node: SimulatedNode) -> Served:
    port = free_port()
    command = [sys.executable, "-m", "exporter", "--web.listen-address", f"127.0.0.1:{port}", "--node", "bench",
               "--registry.dir", str(node.registry), "--no-engines.discover", "--collection.min-interval", "0",
               "--nvml.library", str(node.lib_dir / fakenvml.SONAME)]  # fmt: skip
    return serve("gpu-residency", command, node.environ(), port)
