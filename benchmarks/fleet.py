"""Fleet scale: the dashboards and rules on a real Prometheus holding an hour of a synthetic fleet.

    python -m benchmarks.fleet --nodes 100,300,1000

The fleet is the exporter's own output: one real scrape of `--demo` (8 GPUs, 4 SGLang engines at
TP=2, Ray trainer actors, a leftover process) gives every series a node has, with its labels. Each
node gets those series for an hour at a 15 s scrape, the engines sleeping and waking every two
minutes (memory moving between engines and trainer, release and wake histograms filling, state
flipping), one engine's PIDs churning every ten minutes. That is written as OpenMetrics and
backfilled with `promtool tsdb create-blocks-from openmetrics`; the recording rules are backfilled
over the same hour with `create-blocks-from rules` (one pass per dependency level); a real
Prometheus then serves the TSDB and evaluates the rules and alerts.

Measured, per fleet size: every panel of both dashboards over the last hour for all nodes
(query_range, step 15 s, the median of three), the heaviest panels as they were before the
recording rules, one evaluation of every rule (each expression as an instant query at the hour's
end), series per node. A benchmark, not a test: it reports, it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.sections import splice

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
GIB = 1024**3
STEP = 15  # seconds between samples: Prometheus' scrape interval
HOUR = 3600
PHASE = 120  # engines and trainer swap every two minutes
CHURN = 600  # one engine's PIDs change every ten minutes
RELEASE_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
# The fleet dashboard shows every node; the node dashboard one node (its variable takes one).
VARIABLES = {"$node": ".*", "$gpu": ".*", "$engine": ".*", "$threshold_gib": "2", "$__rate_interval": "1m",
             "$kind": ".*", "$top": "10"}  # fmt: skip
ONE_NODE = "gpu-node-0007"
# The heaviest panels as the node dashboard drew them before the recording rules (issue 20's measurements).
BEFORE = {
    "residency by engine state (join per refresh)": 'sum by (engine, state) (gpu_residency_engine_memory_bytes{node=~".*", engine=~".*"} * on (node, engine) group_left (state) (gpu_residency_engine_state{node=~".*", engine=~".*"} == 1))',
    "release p95 (quantile over every bucket)": 'histogram_quantile(0.95, sum by (le, engine) (rate(gpu_residency_engine_release_seconds_bucket{node=~".*", engine=~".*"}[1m])))',
    "residual outside engines (per refresh)": 'sum by (node, gpu, uuid) (gpu_residency_memory_used_bytes) - sum by (node, gpu, uuid) (gpu_residency_engine_memory_bytes or 0 * gpu_residency_memory_used_bytes)',
}  # fmt: skip


@dataclass(frozen=True)
class Series:
    family: str
    kind: str  # gauge | counter | histogram
    name: str  # the sample name (_total, _bucket, ...)
    labels: dict[str, str]
    value: float


# ---------- the shape of one node ----------


def capture_shape() -> list[Series]:
    """One scrape of the exporter's demo node, once both sleep/wake histograms exist."""
    command = [sys.executable, "-m", "exporter", "--demo", "--web.listen-address", "127.0.0.1:0", "--state.dir", "",
               "--node", "template"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        url, deadline = None, time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            found = re.search(r"listening on (http://\S+?)/metrics", proc.stdout.readline())
            url = found.group(1) if found else None
        while time.monotonic() < deadline + 60:
            text = requests.get(f"{url}/metrics", timeout=10).text
            if (
                "gpu_residency_engine_wake_seconds_bucket{" in text
                and "gpu_residency_engine_release_seconds_bucket{" in text
            ):
                break
            time.sleep(2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    shape = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            shape.append(Series(family.name, family.type, sample.name, dict(sample.labels), sample.value))
    return shape


# ---------- an hour of a node ----------


class Node:
    """One node's values over time: engines awake or asleep, histograms and counters growing."""

    def __init__(self, index: int) -> None:
        rng = random.Random(index)
        self.name = f"gpu-node-{index:04d}"
        self.offset = rng.uniform(0, 2 * PHASE)
        self.releases = [rng.uniform(0.6, 4.0) for _ in range(64)]
        self.wakes = [rng.uniform(0.3, 2.5) for _ in range(64)]

    def awake(self, t: float) -> bool:
        return int((t + self.offset) // PHASE) % 2 == 0

    def transitions(self, t: float, start: float) -> int:
        return int((t + self.offset) // PHASE) - int((start + self.offset) // PHASE)

    def epoch(self, t: float) -> int:
        return int((t + self.offset) // CHURN)


def _holder_bytes(labels: dict[str, str], awake: bool) -> float | None:
    """Memory a process or holder series holds now; None for series that do not follow the phase."""
    kind, engine = labels.get("holder_kind") or labels.get("kind", ""), labels.get("engine", "")
    if engine or kind == "sglang":
        return 62 * GIB if awake else 1.7 * GIB
    if kind == "trainer":
        return 3 * GIB if awake else 68 * GIB
    return None


def _value(series: Series, node: Node, t: float, start: float) -> float:
    awake, name, labels = node.awake(t), series.name, series.labels
    family = series.family
    if family == "gpu_residency_engine_state":
        return 1.0 if labels["state"] == ("active" if awake else "asleep") else 0.0
    if family == "gpu_residency_engine_state_change_timestamp_seconds":
        return (int((t + node.offset) // PHASE) * PHASE) - node.offset
    if family in ("gpu_residency_engine_memory_bytes", "gpu_residency_process_memory_bytes",
                  "gpu_residency_holder_memory_bytes"):  # fmt: skip
        held = _holder_bytes(labels, awake)
        return series.value if held is None else held
    if family == "gpu_residency_memory_used_bytes":
        return (62 + 3 if awake else 1.7 + 68) * GIB + 0.3 * GIB
    if family in ("gpu_residency_engine_release_seconds", "gpu_residency_engine_wake_seconds"):
        durations = node.releases if "release" in family else node.wakes
        done = [durations[i % len(durations)] for i in range(node.transitions(t, start) // 2)]
        if name.endswith("_bucket"):
            bound = float(labels["le"])
            return float(sum(1 for d in done if d <= bound))
        if name.endswith("_count"):
            return float(len(done))
        return float(sum(done))
    if family == "gpu_residency_collections":
        return float((t - start) // STEP)
    return series.value


def _labels(series: Series, node: Node, t: float) -> str:
    labels = dict(series.labels, node=node.name, instance=f"{node.name}:9852", job="gpu-residency")
    if "pid" in labels and labels.get("engine") == "rollout-0":
        labels["pid"] = str(int(labels["pid"]) + 100_000 * node.epoch(t))  # the engine restarted: new PIDs
    return ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))


def write_openmetrics(shape: list[Series], nodes: int, start: float, path: Path) -> int:
    """An hour of `nodes` nodes as OpenMetrics, families contiguous, each series in time order."""
    families: dict[str, list[Series]] = {}
    for series in shape:
        families.setdefault(series.family, []).append(series)
    fleet = [Node(index) for index in range(nodes)]
    times = [start + STEP * i for i in range(HOUR // STEP)]
    samples = 0
    with path.open("w") as out:
        for family, members in families.items():
            out.write(f"# TYPE {family} {members[0].kind}\n")
            for node in fleet:
                if members[0].kind == "histogram":
                    by_labels: dict[tuple, list[Series]] = {}
                    for series in members:
                        key = tuple(sorted((k, v) for k, v in series.labels.items() if k != "le"))
                        by_labels.setdefault(key, []).append(series)
                    groups = list(by_labels.values())
                else:
                    groups = [[series] for series in members]
                for group in groups:
                    lines = []
                    for t in times:
                        for series in group:
                            lines.append(
                                f"{series.name}{{{_labels(series, node, t)}}} {_value(series, node, t, start)} {t:.0f}\n"
                            )
                    out.writelines(lines)
                    samples += len(lines)
        out.write("# EOF\n")
    return samples


# ---------- Prometheus on the backfilled TSDB ----------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Prometheus:
    def __init__(self, data: Path, rule_files: list[Path], workdir: Path) -> None:
        config = workdir / "prometheus.yml"
        rules = "".join(f"\n  - '{p}'" for p in rule_files) or " []"
        config.write_text(f"global:\n  scrape_interval: 15s\n  evaluation_interval: 15s\nrule_files:{rules}\n")
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [shutil.which("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={data}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--storage.tsdb.retention.time=30d",
             "--query.max-samples=200000000"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError("prometheus did not become ready")

    def range_seconds(self, expr: str, start: float, end: float, runs: int = 3) -> tuple[float, int]:
        """(median wall seconds of query_range, series returned)."""
        took, count = [], 0
        for _ in range(runs):
            begun = time.perf_counter()
            answer = requests.get(self.url + "/api/v1/query_range",
                                  params={"query": expr, "start": start, "end": end, "step": STEP}, timeout=600).json()  # fmt: skip
            took.append(time.perf_counter() - begun)
            if answer.get("status") != "success":
                raise RuntimeError(f"{expr}: {answer}")
            count = len(answer["data"]["result"])
        return statistics.median(took), count

    def instant_seconds(self, expr: str, at: float, runs: int = 3) -> float:
        """Median wall seconds of one instant query at `at`: what one rule evaluation costs."""
        took = []
        for _ in range(runs):
            begun = time.perf_counter()
            answer = requests.get(self.url + "/api/v1/query", params={"query": expr, "time": at}, timeout=600).json()
            took.append(time.perf_counter() - begun)
            if answer.get("status") != "success":
                raise RuntimeError(f"{expr}: {answer}")
        return statistics.median(took)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)
        self.log.close()


def _rule_levels(path: Path) -> list[list[dict]]:
    """The recording rules split by dependency level: promtool backfills one level at a time."""
    rules = [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"] if "record" in r]
    levels, done = [], set()
    while len(done) < len(rules):
        level = [r for r in rules if r["record"] not in done
                 and not any(o["record"] in r["expr"] for o in rules if o["record"] not in done and o is not r)]  # fmt: skip
        levels.append(level)
        done |= {r["record"] for r in level}
    return levels


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel, expr) with the variables set to every node."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                if path.stem == "gpu-residency":
                    expr = expr.replace('node=~"$node"', f'node=~"{ONE_NODE}"')
                for name, value in VARIABLES.items():
                    expr = expr.replace(name, value)
                if "kube_pod_info" not in expr:  # another exporter's series: not in this fleet
                    out.append((path.stem, panel["title"], expr))
    return out


def measure(shape: list[Series], nodes: int, workdir: Path) -> dict:
    promtool = shutil.which("promtool")
    end = (time.time() // STEP) * STEP
    start = end - HOUR + STEP
    source = workdir / "fleet.om"
    began = time.monotonic()
    samples = write_openmetrics(shape, nodes, start, source)
    generated = time.monotonic() - began
    data = workdir / "data"
    began = time.monotonic()
    subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(source), str(data)], check=True,
                   capture_output=True)  # fmt: skip
    backfilled = time.monotonic() - began
    size = source.stat().st_size
    source.unlink()
    for number, level in enumerate(_rule_levels(DASHBOARDS / "rules.yaml")):
        level_file = workdir / f"rules-{number}.yaml"
        level_file.write_text(yaml.safe_dump({"groups": [{"name": f"level-{number}", "rules": level}]}))
        prometheus = Prometheus(data, [], workdir)
        try:
            subprocess.run([promtool, "tsdb", "create-blocks-from", "rules", "--start", str(int(start)), "--end",
                            str(int(end)), "--eval-interval", f"{STEP}s", "--url", prometheus.url, "--output-dir",
                            str(workdir / f"recorded-{number}"), str(level_file)],
                           check=True, capture_output=True)  # fmt: skip
        finally:
            prometheus.stop()
        for block in (workdir / f"recorded-{number}").iterdir():
            shutil.move(str(block), data / block.name)
    prometheus = Prometheus(data, [], workdir)
    try:
        panels = []
        for dashboard, title, expr in dashboard_queries():
            seconds, count = prometheus.range_seconds(expr, start, end)
            panels.append({"dashboard": dashboard, "panel": title, "seconds": seconds, "series": count})
        before = [{"panel": title, "seconds": prometheus.range_seconds(expr, start, end)[0]}
                  for title, expr in BEFORE.items()]  # fmt: skip
        rules = {r.get("alert") or r["record"]: r["expr"] for name in ("rules.yaml", "alerts.yaml")
                 for g in yaml.safe_load((DASHBOARDS / name).read_text())["groups"] for r in g["rules"]}  # fmt: skip
        # count(): the rule's evaluation without encoding its (up to 50,000) result series as JSON,
        # which a rule evaluation never does.
        costs = {name: prometheus.instant_seconds(f"count({expr})", end) for name, expr in rules.items()}
        rules_seconds = sum(costs.values())
        slowest = dict(sorted(costs.items(), key=lambda item: -item[1])[:3])
    finally:
        prometheus.stop()
    return {
        "nodes": nodes,
        "series_per_node": len(shape),
        "samples": samples,
        "openmetrics_mb": size / 1e6,
        "generate_s": generated,
        "backfill_s": backfilled,
        "panels": panels,
        "before": before,
        "rules_s": rules_seconds,
        "slowest_rules": slowest,
    }


def report(results: list[dict], stopped: str) -> str:
    lines = ["## Fleet scale: dashboards and rules on a real Prometheus", "",
             "Measured by `python -m benchmarks.fleet` on this machine (2 cores, 24 GiB, shared): an hour of a "
             "synthetic fleet at a 15 s scrape, generated from one real scrape of the exporter's demo node "
             "(8 GPUs, 4 SGLang engines at TP=2, Ray trainer actors), backfilled with promtool, the recording rules "
             "backfilled over the same hour; Prometheus 2.42 serving the TSDB. Each panel: query_range over the "
             "hour, step 15 s, median of three runs, wall time at the client; the fleet dashboard over every "
             f"node, the node dashboard over one ({ONE_NODE}: its node variable takes one). Rules: every recording "
             "and alert rule's expression, wrapped in count() so that no result is encoded, as an instant query at "
             "the hour's last sample, summed (median of three each): what one evaluation of all rules costs, measured the same way at every size.", ""]  # fmt: skip
    lines.append(f"Series per node: **{results[0]['series_per_node']}** (histograms: 8 buckets, were 11). {stopped}")
    lines += ["", "| nodes | samples | OpenMetrics | slowest panel | all panels, summed | every rule once | slowest rule |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        slowest = max(r["panels"], key=lambda p: p["seconds"])
        name, seconds = next(iter(r["slowest_rules"].items()))
        lines.append(
            f"| {r['nodes']} | {r['samples'] / 1e6:.1f} M | {r['openmetrics_mb']:.0f} MB | {slowest['seconds'] * 1e3:.0f} ms "
            f"({slowest['dashboard']}: {slowest['panel']}) | {sum(p['seconds'] for p in r['panels']) * 1e3:.0f} ms | "
            f"{r['rules_s'] * 1e3:.0f} ms | {name} {seconds * 1e3:.1f} ms |"
        )
    lines += ["", "Before and after the recording rules (the same hour, same fleet):", "",
              "| nodes | panel as drawn before | before ms | now (recorded) |", "|---|---|---|---|"]  # fmt: skip
    for r in results:
        for item in r["before"]:
            lines.append(f"| {r['nodes']} | {item['panel']} | {item['seconds'] * 1e3:.0f} | see the panel table |")
    lines += ["", "Every panel, at the largest fleet measured:", "", "| dashboard | panel | ms | series |",
              "|---|---|---|---|"]  # fmt: skip
    for panel in results[-1]["panels"]:
        lines.append(f"| {panel['dashboard']} | {panel['panel']} | {panel['seconds'] * 1e3:.0f} | {panel['series']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="100,300,1000", help="fleet sizes, comma-separated (default 100,300,1000)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--budget-minutes", type=float, default=90.0, help="stop before a size that would overrun")
    args = parser.parse_args()
    for tool in ("promtool", "prometheus"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found (Debian: apt-get install prometheus)")
    began = time.monotonic()
    shape = capture_shape()
    print(f"{len(shape)} series per node", flush=True)
    results, stopped = [], "Every size asked for was measured."
    for nodes in [int(n) for n in args.nodes.split(",")]:
        if results:
            per_node = (time.monotonic() - began) / sum(r["nodes"] for r in results)
            if per_node * nodes > args.budget_minutes * 60 - (time.monotonic() - began):
                stopped = f"Stopped before {nodes} nodes: at {per_node:.1f} s a node it would overrun the budget."
                break
        with tempfile.TemporaryDirectory(prefix="gpu-residency-fleet-") as workdir:
            print(f"{nodes} nodes ...", flush=True)
            results.append(measure(shape, nodes, Path(workdir)))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "panels"}, indent=1), flush=True)
    text = report(results, stopped)
    splice(args.out, "fleet", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
