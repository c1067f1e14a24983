"""All benchmarks in one run, side by side on the same simulated node; writes docs/BENCHMARKS.md
and docs/benchmarks.png.

    python -m benchmarks            # ~30 minutes on 2 cores; --quick for a smoke run
    python -m benchmarks --reaction # only the gate's reaction time (benchmarks/reaction.py), ~9 minutes

Peers: nvitop-exporter (from PyPI, in its own virtual environment under benchmarks/.peers)
and a baseline doing what frameworks do today (benchmarks/baseline.py). Every exporter runs
as its own process against the same fake NVML and the same real process trees; CPU is that
process's user+system time from /proc. Not a test: it measures and reports.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from prometheus_client import CollectorRegistry, generate_latest

import fakenvml
from benchmarks import always_on, reaction
from benchmarks.baseline import TodaysProbe
from benchmarks.node import ROOT, HostProcesses, SimulatedNode
from benchmarks.sections import splice
from benchmarks.serving import Served, serve, serve_ours
from exporter.cli import build_parser
from exporter.errors import ErrorCounter
from exporter.runtime import build_exporter
from exporter.sources.proctable import scan_pids
from fakenvml.prometheus import free_port, start_prometheus

PEERS = ROOT / "benchmarks" / ".peers"
NVITOP_VERSION = "1.7.2"
TICKS = os.sysconf("SC_CLK_TCK")
CYCLE = 0.5  # seconds between collections (and scrapes) in the CPU comparison


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def serve_baseline(node: SimulatedNode) -> Served:
    port = free_port()
    command = [sys.executable, "-m", "benchmarks.baseline", "--port", str(port), "--registry", str(node.registry)]
    return serve("today's probe", command, node.environ(), port)


def nvitop_exporter() -> Path:
    """nvitop-exporter from PyPI in its own venv (its pins are its own business)."""
    binary = PEERS / "bin" / "nvitop-exporter"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
        pip = [str(PEERS / "bin" / "pip"), "install", "-q", f"nvitop-exporter=={NVITOP_VERSION}"]
        subprocess.run(pip, check=True)
    return binary


def serve_nvitop(node: SimulatedNode, interval: float) -> Served:
    port = free_port()
    command = [str(nvitop_exporter()), "--bind-address", "127.0.0.1", "--port", str(port), "--interval", str(interval)]
    return serve("nvitop-exporter", command, node.environ(), port)


def http_latencies(url: str, count: int) -> list[float]:
    session = requests.Session()
    for _ in range(20):
        session.get(url, timeout=10)  # warm
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        session.get(url, timeout=10).raise_for_status()
        latencies.append(time.perf_counter() - started)
    return latencies


def side_by_side(node: SimulatedNode, scrapes: int, window: float) -> list[dict]:
    """Latency of /metrics, and CPU per collect-and-serve cycle, for the three exporters on one node.

    CPU: each exporter is scraped every CYCLE seconds for `window` seconds, nvitop-exporter
    also collecting every CYCLE seconds in the background; its process CPU over the window
    divided by the cycles is one collection plus one scrape, the same work for all three.
    """
    rows = []
    for name, start in (("gpu-residency", serve_ours), ("today's probe", serve_baseline), ("nvitop-exporter", None)):
        served = start(node) if start else serve_nvitop(node, CYCLE)
        try:
            latencies = http_latencies(served.url, scrapes)
            session, cycles = requests.Session(), int(window / CYCLE)
            cpu_before = cpu_seconds(served.proc.pid)
            for _ in range(cycles):
                session.get(served.url, timeout=10).raise_for_status()
                time.sleep(CYCLE)
            cpu = (cpu_seconds(served.proc.pid) - cpu_before) / cycles
        finally:
            served.stop()
        how = "background every 0.5 s; /metrics serves the cached result" if start is None else "on each scrape"
        rows.append({"name": name, "latencies": latencies, "cpu_per_collection": cpu, "note": how})
    return rows


def in_process_collector(node: SimulatedNode):
    """The exporter's own assembly in this process (no HTTP): collection cost alone."""
    os.environ["FAKE_NVML_SCENARIO"] = str(node.scenario.path)
    args = build_parser().parse_args(
        ["--node", "bench", "--registry.dir", str(node.registry), "--no-engines.discover",
         "--collection.min-interval", "0", "--nvml.library", str(node.lib_dir / fakenvml.SONAME)]
    )  # fmt: skip
    registry = CollectorRegistry(auto_describe=False)
    registry.register(build_exporter(args, ErrorCounter()).collector)
    return registry


def time_calls(call, count: int) -> tuple[float, float, float]:
    """(median ms, p99 ms, CPU ms per call) of `call`."""
    for _ in range(10):
        call()
    samples, cpu_before = [], time.process_time()
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    cpu = (time.process_time() - cpu_before) / count
    return statistics.median(samples) * 1e3, percentile(samples, 0.99) * 1e3, cpu * 1e3


def scaling(process_counts: list[int], gpu_counts: list[int], engine_counts: list[int], calls: int) -> list[dict]:
    rows = []
    for total in process_counts:
        with HostProcesses(total):
            for gpus in gpu_counts:
                for engines in engine_counts:
                    with SimulatedNode(gpus, engines) as node:
                        registry = in_process_collector(node)
                        median, p99, cpu = time_calls(lambda r=registry: generate_latest(r), calls)
                        probe = TodaysProbe(node.registry)
                        base_median, _, _ = time_calls(lambda p=probe: list(p.collect()), max(5, calls // 10))
                        rows.append({"gpus": gpus, "engines": engines, "processes": len(scan_pids()),
                                     "median_ms": median, "p99_ms": p99, "cpu_ms": cpu,
                                     "baseline_median_ms": base_median})  # fmt: skip
                        print(f"  scaling {rows[-1]}", flush=True)
    return rows


def series_and_memory(node: SimulatedNode, scrapes: int) -> dict:
    served = serve_ours(node)
    try:
        session = requests.Session()
        body = session.get(served.url, timeout=10).text
        series = sum(1 for line in body.splitlines() if line and not line.startswith("#"))
        rss_start = rss_kib(served.proc.pid)
        for _ in range(scrapes):
            session.get(served.url, timeout=10)
        rss_end = rss_kib(served.proc.pid)
    finally:
        served.stop()
    return {"series": series, "rss_start_kib": rss_start, "rss_end_kib": rss_end, "scrapes": scrapes}


def gate_latency(node: SimulatedNode, checks: int) -> dict:
    from gate import ResidualGate
    from gate.nvml_source import NvmlSource

    ctypes.CDLL(str(node.lib_dir / fakenvml.SONAME))
    os.environ["FAKE_NVML_SCENARIO"] = str(node.scenario.path)
    gate = ResidualGate(2, source=NvmlSource())
    result = {"nvml": time_calls(lambda: gate.check([0, 1, 2, 3]), checks)}
    binary = shutil.which("prometheus")
    if binary:
        served = serve_ours(node)
        prometheus = start_prometheus(binary, Path(tempfile.mkdtemp()), [served.url.split("/")[2]])
        try:
            prometheus.wait_for("gpu_residency_memory_used_bytes")
            remote = ResidualGate(2, source="prometheus", prometheus_url=prometheus.url)
            result["prometheus"] = time_calls(lambda: remote.check([0, 1, 2, 3], node="bench"), max(50, checks // 10))
        finally:
            prometheus.stop()
            served.stop()
    result["import_ms"] = import_time()
    return result


def import_time(runs: int = 20) -> float:
    """Median extra wall time of `python -c "import gate"` over `python -c "pass"`."""

    def run(code: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        return time.perf_counter() - started

    gate_runs, bare_runs = [], []
    for _ in range(runs):  # interleaved, so machine noise hits both alike
        gate_runs.append(run("import gate"))
        bare_runs.append(run("pass"))
    return (statistics.median(gate_runs) - statistics.median(bare_runs)) * 1e3


def plot(side: list[dict], scale: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [row["name"] for row in side]
    left.bar(names, [row["cpu_per_collection"] * 1e3 for row in side], color=["tab:green", "tab:gray", "tab:orange"])
    left.set_ylabel("CPU ms per collection")
    left.set_title("8 GPUs, 8 engines: CPU per collection")
    for gpus in sorted({r["gpus"] for r in scale}):
        for engines in sorted({r["engines"] for r in scale}):
            rows = [r for r in scale if r["gpus"] == gpus and r["engines"] == engines]
            right.plot([r["processes"] for r in rows], [r["median_ms"] for r in rows], marker="o",
                       label=f"{gpus} GPU, {engines} engines")  # fmt: skip
    right.set_xlabel("host processes")
    right.set_ylabel("median collection ms (gpu-residency)")
    right.set_title("Scaling")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


PROFILING = [
    "## What profiling changed (py-spy on the exporter under back-to-back scrapes)",
    "",
    "The first full run missed the 5x CPU target against nvitop-exporter (4.0x: 4.17 ms per cycle against "
    "16.83 ms) and showed /metrics medians of 48 ms once keep-alive was on. py-spy showed, in order: the "
    "40 ms delayed-ACK stall of a response written in two packets (fixed: TCP_NODELAY on the HTTP/1.1 "
    "keep-alive server that replaced wsgiref's HTTP/1.0 one, which opened a connection and a thread per "
    "scrape); prometheus_client's text encoder re-validating every label name of every sample (replaced by "
    "exporter/web/exposition.py for our fixed names: 1.94 to 1.54 ms CPU per back-to-back scrape); the "
    "SGLang process title read from /proc/<pid>/cmdline on every scrape, and NVML device handles fetched on "
    "every scrape (both now cached for the life of the process or NVML session); engines re-resolved four "
    "times a second by the sleep/wake watcher even when nothing changed (now a stat of the registry "
    "directory; idle CPU 4 to 1.5 ms/s).",
    "",
    "After them the table above is the result: against nvitop-exporter the 5x target is still missed "
    "(about 4.4x in this run). What remains per cycle is about 1 ms of collection, the HTTP and gzip path, "
    "and the cost of a cold process waking every 0.5 s; back to back a scrape costs 1.5 ms CPU. On a real "
    "GPU nvitop's many NVML calls do real work instead of failing fast, so the ratio there is likely higher; "
    "that is for a session with a device to measure.",
    "",
]


def report(side, scale, memory, gate, command: str, elapsed: float) -> str:
    ours = side[0]["cpu_per_collection"]
    lines = [
        f"Measured by `{command}` in one run ({elapsed / 60:.1f} min) on {platform.node() or 'this machine'}:",
        f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
        f"{len(scan_pids())} host processes at the end. A shared, noisy machine: read the ratios, "
        "measured side by side, not the absolute numbers. All on the fake NVML (no GPU here).",
        "",
        "![benchmarks](benchmarks.png)",
        "",
        "## Side by side: 8 GPUs, 8 engines, the processes of this machine",
        "",
        "| exporter | /metrics median ms | /metrics p99 ms | CPU ms per collection | CPU vs ours | how it collects |",
        "|---|---|---|---|---|---|",
    ]
    for row in side:
        lines.append(
            f"| {row['name']} | {statistics.median(row['latencies']) * 1e3:.2f} | "
            f"{percentile(row['latencies'], 0.99) * 1e3:.2f} | {row['cpu_per_collection'] * 1e3:.2f} | "
            f"{row['cpu_per_collection'] / ours:.1f}x | {row['note']} |"
        )
    lines += [
        "",
        f"CPU per collection: each exporter's own process CPU (user+system, /proc) while it is scraped every "
        f"{CYCLE} s for the window, nvitop-exporter collecting every {CYCLE} s too, divided by the cycles: one "
        "collection and one scrape each, HTTP and exposition included. gpu-residency runs with "
        "`--collection.min-interval 0` (a collection per scrape). /metrics latency: back-to-back scrapes; "
        "nvitop-exporter's serves a cached result. nvitop reads many more NVML fields (utilization, clocks, "
        "temperatures, …); on the fake NVML several are missing and fail fast, so on a real GPU its cost is "
        "higher than here.",
        "",
        "## Scaling (collection in-process, no HTTP)",
        "",
        "| GPUs | engines | host processes | median ms | p99 ms | CPU ms | today's probe median ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in scale:
        lines.append(
            f"| {r['gpus']} | {r['engines']} | {r['processes']} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['cpu_ms']:.2f} | {r['baseline_median_ms']:.1f} |"
        )
    lines += [
        "",
        "gpu-residency walks up from each GPU process to an engine root, reading a handful of /proc entries, "
        "so its cost follows the number of GPU processes and engines, not the host's process count; today's "
        "probe walks the whole process table once per engine.",
        "",
        "## Series and memory",
        "",
        f"- series per node at 8 GPUs and 8 engines: {memory['series']}",
        f"- exporter resident memory: {memory['rss_start_kib'] / 1024:.1f} MiB after the first scrape, "
        f"{memory['rss_end_kib'] / 1024:.1f} MiB after {memory['scrapes']:,} more",
        "",
        "## Gate decision latency",
        "",
        "| source | median ms | p99 ms |",
        "|---|---|---|",
        f"| local NVML (4 GPUs) | {gate['nvml'][0]:.3f} | {gate['nvml'][1]:.3f} |",
    ]
    if "prometheus" in gate:
        lines.append(f"| Prometheus on loopback (4 GPUs) | {gate['prometheus'][0]:.2f} | {gate['prometheus'][1]:.2f} |")
    lines += ["", f"`import gate`: {gate['import_ms']:.1f} ms over a bare interpreter start (median of 20 each).", ""]
    lines += PROFILING
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples and a smaller matrix (a smoke run)")
    parser.add_argument(
        "--reaction",
        action="store_true",
        help="only the gate's reaction time: updates its section of BENCHMARKS.md and reaction.png",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    if args.reaction:
        return reaction.main(["--out", str(args.out), *(["--quick"] if args.quick else [])])
    started = time.monotonic()
    scrapes, calls = (50, 20) if args.quick else (500, 200)
    with SimulatedNode(8, 8) as node:
        print("side by side ...", flush=True)
        side = side_by_side(node, scrapes, window=5 if args.quick else 30)
        print("series and memory ...", flush=True)
        memory = series_and_memory(node, 500 if args.quick else 10_000)
        print("gate ...", flush=True)
        gate = gate_latency(node, 200 if args.quick else 2000)
    print("scaling ...", flush=True)
    matrix = ([100, 1000], [1, 8], [1, 8]) if args.quick else ([100, 1000, 3000], [1, 8], [1, 8, 32])
    scale = scaling(*matrix, calls=calls)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(side, scale, args.out / "benchmarks.png")
    command = "python -m benchmarks" + (" --quick" if args.quick else "")
    text = report(side, scale, memory, gate, command, time.monotonic() - started)
    splice(args.out / "BENCHMARKS.md", "node", text)
    print(text)
    print("always-on ...", flush=True)
    always_on.main(["--out", str(args.out), *(["--quick"] if args.quick else [])])
    print("reaction ...", flush=True)
    return reaction.main(["--out", str(args.out), *(["--quick"] if args.quick else [])])
