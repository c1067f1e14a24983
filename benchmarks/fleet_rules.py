"""Every rule's evaluation time before and after issue 26, in one run on one Prometheus.

    python -m benchmarks.fleet_rules --nodes 100,300,1000

The rules and alerts as they were (`git show BASE:dashboards/...`: residuals rebuilt from four
families, every group every 15 s) and as they are (the exporter publishes the residuals, the
latency quantiles and GpuEngineReleaseSlow every minute) are loaded side by side into one real
Prometheus, the old ones renamed (`before:` on every recorded name, `before/` on every group) so
neither writes the other's series. That Prometheus scrapes the live synthetic fleet of
benchmarks/fleet.py every 15 s (the series of the exporter as it is now, a superset of what the old
rules read) and evaluates both sets; after every 5-minute window ends in live data, each group's
`evaluationTime` from /api/v1/rules, the median over the evaluations that follow. Two figures per set:
every rule once (the sum over its groups) and the cost per 15 s (a 1-minute group counts a quarter).
Both sets share the same 2 cores, the same scrape and the same moments: read the ratio.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.fleet import (
    DASHBOARDS,
    HOUR,
    LIVE_MEASURE,
    LIVE_WARMUP,
    ROOT,
    STEP,
    LiveFleet,
    Prometheus,
    capture_shape,
)
from benchmarks.sections import splice

BASE = "b493874"  # the commit issue 26 started from
SETS = ("before", "after")


def _seconds(interval: str | None) -> float:
    if interval is None:
        return float(STEP)
    number, unit = re.fullmatch(r"(\d+)([smh])", interval).groups()
    return float(number) * {"s": 1, "m": 60, "h": 3600}[unit]


def rule_files(workdir: Path) -> tuple[list[Path], dict[str, float]]:
    """The two sets as files, and each group's interval in seconds (by its name here)."""
    names = ("rules.yaml", "alerts.yaml")
    texts = {
        "before": [subprocess.run(["git", "show", f"{BASE}:dashboards/{name}"], cwd=ROOT, capture_output=True,
                                  text=True, check=True).stdout for name in names],
        "after": [(DASHBOARDS / name).read_text() for name in names],
    }  # fmt: skip
    files, intervals = [], {}
    for label, contents in texts.items():
        sets = [yaml.safe_load(text)["groups"] for text in contents]
        recorded = sorted((r["record"] for groups in sets for g in groups for r in g["rules"] if "record" in r),
                          key=len, reverse=True)  # fmt: skip
        for name, groups in zip(names, sets, strict=True):
            for group in groups:
                group["name"] = f"{label}/{group['name']}"
                intervals[group["name"]] = _seconds(group.get("interval"))
                if label == "before":
                    _rename(group["rules"], recorded)
            path = workdir / f"{label}-{name}"
            path.write_text(yaml.safe_dump({"groups": groups}))
            files.append(path)
    return files, intervals


def _rename(rules: list[dict], recorded: list[str]) -> None:
    """The old set writes and reads its own series (`before:`), and alerts of its own name."""
    for rule in rules:
        for record in recorded:
            rule["expr"] = re.sub(rf"(?<![\w:]){re.escape(record)}(?![\w:])", f"before:{record}", rule["expr"])
        if "record" in rule:
            rule["record"] = f"before:{rule['record']}"
        if "alert" in rule:
            rule["alert"] = f"Before{rule['alert']}"


def measure(shape: list, nodes: int, workdir: Path) -> dict:
    files, intervals = rule_files(workdir)
    fleet = LiveFleet(shape, nodes, time.time() - HOUR)
    prometheus = Prometheus(workdir / "data", workdir, tuple(files), fleet.target)
    try:
        time.sleep(LIVE_WARMUP)
        seen: dict[tuple[str, str], float] = {}
        deadline = time.monotonic() + max(LIVE_MEASURE, 150)  # two evaluations of a 1-minute group at least
        while time.monotonic() < deadline:
            for name, group in prometheus.rule_evaluations().items():
                seen[(name, group["at"])] = group["seconds"]
            time.sleep(STEP / 3)
        missed = prometheus.own_metric("prometheus_rule_group_iterations_missed_total")
    finally:
        prometheus.stop()
        fleet.stop()
    medians = {g: statistics.median(s for (name, _), s in seen.items() if name == g) for g in {n for n, _ in seen}}
    result = {"nodes": nodes, "missed": missed}
    for label in SETS:
        mine = {g: t for g, t in medians.items() if g.startswith(label + "/")}
        result[label] = {
            "once_s": sum(mine.values()),
            "per_step_s": sum(t * STEP / intervals[g] for g, t in mine.items()),
            "groups": {g.split("/", 1)[1]: t for g, t in sorted(mine.items())},
        }
    return result


def report(results: list[dict], command: str, elapsed: float) -> str:
    lines = [
        "## Rules before and after issue 26, side by side",
        "",
        f"Measured by `{command}` in one run ({elapsed / 60:.1f} min) on this machine (2 cores shared with other "
        "work, the fleet served by a Python process on the same cores): one Prometheus 2.42 scraping the live "
        f"synthetic fleet every 15 s and evaluating both rule sets (rules.yaml and alerts.yaml as of {BASE}, "
        "renamed, and as they are now) on the same data at the same moments. Each group's evaluationTime, the "
        "median of its evaluations after every 5-minute window ended in live data; 'every rule once' sums the "
        "groups, 'per 15 s' weighs a 1-minute group by a quarter (what the rules cost Prometheus per scrape "
        "interval).",
        "",
        "| nodes | before: every rule once | after: every rule once | before: per 15 s | after: per 15 s | "
        "missed iterations |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        b, a = r["before"], r["after"]
        lines.append(
            f"| {r['nodes']} | {b['once_s'] * 1e3:.0f} ms | **{a['once_s'] * 1e3:.0f} ms** | "
            f"{b['per_step_s'] * 1e3:.0f} ms | **{a['per_step_s'] * 1e3:.0f} ms** | {r['missed']:.0f} |"
        )
    lines += ["", "Each group (ms, median evaluation):", "", "| nodes | set | group | ms |", "|---|---|---|---|"]
    for r in results:
        for label in SETS:
            for group, seconds in r[label]["groups"].items():
                lines.append(f"| {r['nodes']} | {label} | {group} | {seconds * 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="100,300,1000")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    began = time.monotonic()
    shape = capture_shape()
    results = []
    for nodes in [int(n) for n in args.nodes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="gpu-residency-rules-") as workdir:
            print(f"{nodes} nodes ...", flush=True)
            results.append(measure(shape, nodes, Path(workdir)))
            print(results[-1], flush=True)
    text = report(results, f"python -m benchmarks.fleet_rules --nodes {args.nodes}", time.monotonic() - began)
    splice(args.out, "fleet-rules", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
