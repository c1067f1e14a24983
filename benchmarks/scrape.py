"""Scrape latency of the exporter on a simulated node: N GPUs, M engines, real process trees.

    python -m benchmarks.scrape --gpus 8 --engines 8 --scrapes 500

Reports the median and p99 of a full /metrics request over loopback HTTP and of the
collection alone (NVML reads, /proc walk, attribution, exposition), plus CPU time per
collection. Not a test: it measures and prints.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from prometheus_client import CollectorRegistry, generate_latest

import fakenvml
from exporter.collector import ResidencyCollector
from exporter.engines import EngineCatalog
from exporter.errors import ErrorCounter
from exporter.nvml_source import NvmlSource
from exporter.registry import register_engine
from exporter.server import ExporterServer, make_app

ROOT = Path(__file__).resolve().parent.parent


def start_trees(engines: int, leaves: int) -> list[tuple[subprocess.Popen, list[int]]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    trees = []
    for _ in range(engines):
        proc = subprocess.Popen(
            [sys.executable, "-m", "fakenvml.tree", "--depth", "2", "--leaves", str(leaves), "--max-seconds", "600"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        trees.append((proc, [int(proc.stdout.readline()) for _ in range(leaves)]))
    return trees


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def build_node(workdir: Path, gpus: int, engines: int) -> tuple[ResidencyCollector, list]:
    lib_dir = fakenvml.build()
    scenario = fakenvml.Scenario.with_gpus(workdir / "scenario.json", gpus)
    registry = workdir / "engines"
    leaves_per_engine = max(1, gpus // engines)
    trees = start_trees(engines, leaves_per_engine)
    for index, (proc, leaves) in enumerate(trees):
        register_engine(f"engine-{index}", root_pid=proc.pid, directory=registry)
        for rank, pid in enumerate(leaves):
            gpu = scenario.gpus[(index * leaves_per_engine + rank) % gpus]
            gpu.processes.append((pid, 10 * fakenvml.GIB))
    for gpu in scenario.gpus:
        gpu.used = sum(used for _, used in gpu.processes) + fakenvml.GIB
    scenario.write()
    os.environ["FAKE_NVML_SCENARIO"] = str(scenario.path)
    errors = ErrorCounter()
    catalog = EngineCatalog(errors, registry_dir=registry, discover=False)
    nvml = NvmlSource(errors, library_path=str(lib_dir / fakenvml.SONAME))
    return ResidencyCollector("bench", nvml, catalog, errors), trees


def measure(collector: ResidencyCollector, scrapes: int) -> dict[str, float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server = ExporterServer(make_app(registry, "/metrics"), "127.0.0.1", 0)
    server.start()
    url = f"http://127.0.0.1:{server.address[1]}/metrics"
    session = requests.Session()
    session.get(url, timeout=10)  # warm: NVML init, first /proc reads
    http, collect, cpu = [], [], []
    try:
        for _ in range(scrapes):
            start = time.perf_counter()
            session.get(url, timeout=10).raise_for_status()
            http.append(time.perf_counter() - start)
            cpu_start, start = time.process_time(), time.perf_counter()
            generate_latest(registry)
            collect.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
    finally:
        server.stop()
    series = sum(1 for line in generate_latest(registry).decode().splitlines() if line and not line.startswith("#"))
    return {
        "http_median_ms": statistics.median(http) * 1e3,
        "http_p99_ms": percentile(http, 0.99) * 1e3,
        "collect_median_ms": statistics.median(collect) * 1e3,
        "collect_p99_ms": percentile(collect, 0.99) * 1e3,
        "cpu_per_collection_ms": statistics.mean(cpu) * 1e3,
        "series": series,
        "host_processes": len([n for n in os.listdir("/proc") if n.isdigit()]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--engines", type=int, default=8)
    parser.add_argument("--scrapes", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        collector, trees = build_node(Path(tmp), args.gpus, args.engines)
        try:
            result = measure(collector, args.scrapes)
        finally:
            for proc, _ in trees:
                proc.terminate()
                proc.wait(timeout=10)
    print(f"gpus={args.gpus} engines={args.engines} scrapes={args.scrapes}")
    for key, value in result.items():
        print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
