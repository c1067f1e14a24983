"""Fleet scale: the dashboards and rules on a real Prometheus holding an hour of a synthetic fleet.

    python -m benchmarks.fleet --nodes 100,300,1000

The fleet is the exporter's own output: one real scrape of `--demo` (8 GPUs, 4 SGLang engines at
TP=2, Ray trainer actors, a leftover process) gives every series a node has, with its labels. Each
node gets those series for an hour at a 15 s scrape, the engines sleeping and waking every two
minutes (memory moving between engines and trainer, release and wake histograms filling, state
flipping), one engine's PIDs churning every ten minutes. That is written as OpenMetrics and
backfilled with `promtool tsdb create-blocks-from openmetrics`; the recording rules are backfilled
over the same hour with `create-blocks-from rules` (one pass per dependency level); a real
Prometheus then serves the TSDB (once it has merged the backfill's overlapping blocks, as a
running one would have). For the rules, the fleet is then served live and that Prometheus scrapes
it every 15 s and evaluates the rules and alerts itself, on the minutes it holds in memory.

Measured, per fleet size: every panel of both dashboards over the last hour for all nodes
(query_range, step 15 s, the median of three), the heaviest panels as they were before the
recording rules, one evaluation of every rule and alert as Prometheus times it (each group's
evaluationTime, the median over six evaluations, summed over the groups), series per node. A benchmark, not a test: it reports, it asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
LIVE_WARMUP = 330  # seconds of live scraping before rules are timed: every 5m window ends in live data
LIVE_MEASURE = 90  # seconds of rule evaluations timed (six at a 15 s interval)
RELEASE_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
# The fleet dashboard shows every node; the node dashboard one node (its variable takes one).
VARIABLES = {"$cluster": ".*", "$node": ".*", "$gpu": ".*", "$engine": ".*", "$threshold_gib": "2", "$__rate_interval": "1m",
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


def exposition(
    shape: list[Series], fleet: list[Node], times: list[float], start: float, stamped: bool
) -> Iterator[str]:
    """OpenMetrics lines for `fleet` at `times`: families contiguous, each series in time order.

    Stamped (with each sample's time) for a backfill; unstamped for a live scrape at one time.
    """
    families: dict[str, list[Series]] = {}
    for series in shape:
        families.setdefault(series.family, []).append(series)
    for family, members in families.items():
        yield f"# TYPE {family} {members[0].kind}\n"
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
                for t in times:
                    stamp = f" {t:.0f}" if stamped else ""
                    for series in group:
                        yield f"{series.name}{{{_labels(series, node, t)}}} {_value(series, node, t, start)}{stamp}\n"
    yield "# EOF\n"


def write_openmetrics(shape: list[Series], nodes: int, start: float, path: Path) -> int:
    """An hour of `nodes` nodes as OpenMetrics for promtool; returns the number of samples."""
    times = [start + STEP * i for i in range(HOUR // STEP)]
    with path.open("w") as out:
        out.writelines(exposition(shape, [Node(index) for index in range(nodes)], times, start, stamped=True))
    return len(shape) * nodes * len(times)


class LiveFleet:
    """The fleet's exposition now, served on loopback for a Prometheus to scrape (all nodes, one target)."""

    def __init__(self, shape: list[Series], nodes: int, start: float) -> None:
        fleet = [Node(index) for index in range(nodes)]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = "".join(exposition(shape, fleet, [time.time()], start, stamped=False)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.target = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------- Prometheus on the backfilled TSDB ----------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Prometheus:
    """A real Prometheus on `data`: serving queries, and where given, evaluating rules over a live scrape."""

    def __init__(self, data: Path, workdir: Path, rule_files: tuple[Path, ...] = (), target: str = "") -> None:
        config = workdir / "prometheus.yml"
        rules = "".join(f"\n  - '{p}'" for p in rule_files) or " []"
        scrape = (f"\nscrape_configs:\n  - job_name: gpu-residency\n    honor_labels: true\n    scrape_timeout: 14s\n"
                  f"    static_configs: [{{targets: ['{target}']}}]\n") if target else ""  # fmt: skip
        config.write_text(f"global:\n  scrape_interval: 15s\n  evaluation_interval: 15s\nrule_files:{rules}\n{scrape}")
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = (workdir / "prometheus.log").open("a")
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

    def own_metric(self, name: str) -> float:
        """A value from Prometheus' own /metrics (summed over its label sets)."""
        text = requests.get(self.url + "/metrics", timeout=30).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and line[len(name)] in " {")  # fmt: skip

    def wait_compacted(self, data: Path, limit: float = 1800) -> float:
        """Wait until the backfilled blocks no longer overlap; returns the seconds waited.

        Backfills leave overlapping blocks (one set per pass), which Prometheus merges by itself a
        minute after it starts. A long-running Prometheus holds merged blocks; measuring before or
        during that merge measures the merge.
        """
        began = time.monotonic()
        while time.monotonic() - began < limit:
            spans = sorted((meta["minTime"], meta["maxTime"]) for meta in
                           (json.loads(m.read_text()) for m in data.glob("*/meta.json") if "tmp" not in m.parent.name))  # fmt: skip
            merged = all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans))
            if merged and self.own_metric("prometheus_tsdb_blocks_loaded") == len(spans):
                return time.monotonic() - began
            time.sleep(5)
        raise RuntimeError(f"the TSDB's blocks still overlap after {limit:.0f} s")

    def rule_evaluations(self) -> dict[str, dict]:
        """Each rule group's last evaluation as Prometheus reports it: {group: {seconds, rules: {name: seconds}}}."""
        groups = requests.get(self.url + "/api/v1/rules", timeout=30).json()["data"]["groups"]
        return {g["name"]: {"seconds": g["evaluationTime"], "at": g["lastEvaluation"],
                            "rules": {r["name"]: r["evaluationTime"] for r in g["rules"]}} for g in groups}  # fmt: skip

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

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=300)
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
        prometheus = Prometheus(data, workdir)
        try:
            subprocess.run([promtool, "tsdb", "create-blocks-from", "rules", "--start", str(int(start)), "--end",
                            str(int(end)), "--eval-interval", f"{STEP}s", "--url", prometheus.url, "--output-dir",
                            str(workdir / f"recorded-{number}"), str(level_file)],
                           check=True, capture_output=True)  # fmt: skip
        finally:
            prometheus.stop()
        for block in (workdir / f"recorded-{number}").iterdir():
            shutil.move(str(block), data / block.name)
    prometheus = Prometheus(data, workdir)
    try:
        merged = prometheus.wait_compacted(data)
        panels = []
        for dashboard, title, expr in dashboard_queries():
            seconds, count = prometheus.range_seconds(expr, start, end)
            panels.append({"dashboard": dashboard, "panel": title, "seconds": seconds, "series": count})
        before = [{"panel": title, "seconds": prometheus.range_seconds(expr, start, end)[0]}
                  for title, expr in BEFORE.items()]  # fmt: skip
    finally:
        prometheus.stop()
    return {
        "nodes": nodes,
        "series_per_node": len(shape),
        "samples": samples,
        "openmetrics_mb": size / 1e6,
        "generate_s": generated,
        "backfill_s": backfilled,
        "merge_wait_s": merged,
        "panels": panels,
        "before": before,
        **evaluate_rules_live(shape, nodes, start, data, workdir),
    }


def evaluate_rules_live(shape: list[Series], nodes: int, start: float, data: Path, workdir: Path) -> dict:
    """One evaluation of every rule, as Prometheus itself times it while it scrapes the fleet live.

    Rules run on the newest minutes, which a running Prometheus holds in memory (its head), not in
    the blocks a backfill writes: the fleet is served live, scraped every 15 s, and the rules
    evaluated every 15 s; after LIVE_WARMUP every window a rule reads ends in live data. Each
    group's and each rule's `evaluationTime` from /api/v1/rules, over the evaluations that follow.
    """
    fleet = LiveFleet(shape, nodes, start)
    prometheus = Prometheus(data, workdir, (DASHBOARDS / "rules.yaml", DASHBOARDS / "alerts.yaml"), fleet.target)
    try:
        time.sleep(LIVE_WARMUP)
        seen: dict[tuple[str, str], dict] = {}
        deadline = time.monotonic() + LIVE_MEASURE
        while time.monotonic() < deadline:
            for name, group in prometheus.rule_evaluations().items():
                seen[(name, group["at"])] = dict(group, name=name)
            time.sleep(STEP / 3)
        missed = prometheus.own_metric("prometheus_rule_group_iterations_missed_total")
    finally:
        prometheus.stop()
        fleet.stop()
    groups = {name for name, _ in seen}
    per_group = {name: statistics.median(e["seconds"] for e in seen.values() if e["name"] == name) for name in groups}
    per_rule: dict[str, list[float]] = {}
    for evaluation in seen.values():
        for rule, seconds in evaluation["rules"].items():
            per_rule.setdefault(rule, []).append(seconds)
    slowest = sorted(((statistics.median(v), k) for k, v in per_rule.items()), reverse=True)[:3]
    return {
        "rules_s": sum(per_group.values()),
        "rules_groups": len(groups),
        "rules_evaluations": min(sum(1 for e in seen.values() if e["name"] == name) for name in groups),
        "rules_missed": missed,
        "slowest_rules": {name: seconds for seconds, name in slowest},
    }


def report(results: list[dict], stopped: str) -> str:
    lines = ["## Fleet scale: dashboards and rules on a real Prometheus", "",
             "Measured by `python -m benchmarks.fleet` on this machine (2 cores, 24 GiB, shared): an hour of a "
             "synthetic fleet at a 15 s scrape, generated from one real scrape of the exporter's demo node "
             "(8 GPUs, 4 SGLang engines at TP=2, Ray trainer actors), backfilled with promtool, the recording rules "
             "backfilled over the same hour; Prometheus 2.42 serving the TSDB once it had merged the backfill's "
             "overlapping blocks (as a running Prometheus holds them). Each panel: query_range over the "
             "hour, step 15 s, median of three runs, wall time at the client; the fleet dashboard over every "
             f"node, the node dashboard over one ({ONE_NODE}: its node variable takes one).", "",
             "Rules: the same Prometheus then scraped the fleet live (every node's series, every 15 s) and evaluated "
             "`rules.yaml` and `alerts.yaml` itself every 15 s, as in production, on the minutes it holds in memory; "
             f"after {LIVE_WARMUP // 60} min (every 5 m window ending in live data) each group's `evaluationTime` "
             "from /api/v1/rules, the median over the evaluations of the next 90 s, summed over the groups: what one "
             "evaluation of every rule costs. The scrape and the rules shared the 2 cores with the Python process "
             "serving the fleet.", ""]  # fmt: skip
    lines.append(f"Series per node: **{results[0]['series_per_node']}** (histograms: 8 buckets, were 11). {stopped}")
    lines += ["", "| nodes | samples | OpenMetrics | slowest panel | all panels, summed | every rule once "
              "(groups, evaluations timed, missed) | slowest rule |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        slowest = max(r["panels"], key=lambda p: p["seconds"])
        name, seconds = next(iter(r["slowest_rules"].items()))
        lines.append(
            f"| {r['nodes']} | {r['samples'] / 1e6:.1f} M | {r['openmetrics_mb']:.0f} MB | {slowest['seconds'] * 1e3:.0f} ms "
            f"({slowest['dashboard']}: {slowest['panel']}) | {sum(p['seconds'] for p in r['panels']) * 1e3:.0f} ms | "
            f"**{r['rules_s'] * 1e3:.0f} ms** ({r['rules_groups']}, {r['rules_evaluations']}, {r['rules_missed']:.0f}) "
            f"| {name} {seconds * 1e3:.1f} ms |"
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
