"""Alert rules and dashboards, checked by the real tools: promtool, and a real Prometheus that
scraped the exporter running the demo scenario."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import ROOT, require_tool, start_exporter

DASHBOARDS = ROOT / "dashboards"
RULES = DASHBOARDS / "alerts.yaml"
RECORDING = DASHBOARDS / "rules.yaml"
CONTRACT_METRICS = {
    "gpu_residency_memory_used_bytes", "gpu_residency_memory_total_bytes", "gpu_residency_memory_reserved_bytes",
    "gpu_residency_process_memory_bytes", "gpu_residency_engine_memory_bytes",
    "gpu_residency_unattributed_memory_bytes", "gpu_residency_engine_up", "gpu_residency_sglang_memory_bytes",
    "gpu_residency_sglang_token_capacity", "gpu_residency_sglang_up", "gpu_residency_engine_exits_total",
    "gpu_residency_nvml_up", "gpu_residency_scrape_duration_seconds", "gpu_residency_errors_total",
    "gpu_residency_build_info", "gpu_residency_engine_state", "gpu_residency_engine_state_change_timestamp_seconds",
    "gpu_residency_engine_release_seconds_bucket", "gpu_residency_engine_wake_seconds_bucket",
    "gpu_residency_engine_release_timeouts_total", "gpu_residency_engine_wake_timeouts_total",
    "gpu_residency_gate_clear", "gpu_residency_gate_decision_timestamp_seconds",
    "gpu_residency_holder_memory_bytes", "gpu_residency_collector_success",
    "gpu_residency_vllm_up", "gpu_residency_vllm_sleep_level", "gpu_residency_vllm_kv_cache_usage_ratio",
    "gpu_residency_vllm_kv_cache_capacity_tokens", "gpu_residency_vllm_kv_cache_capacity_blocks",
    "gpu_residency_vllm_kv_cache_block_size_tokens", "gpu_residency_engine_state_mismatch",
    "gpu_residency_engine_state_mismatches_total", "gpu_residency_engine_release_cycles_total",
    "gpu_residency_engine_release_residual_bytes", "gpu_residency_engine_release_residual_growth_bytes_per_cycle",
    "gpu_residency_engine_release_floor_bytes",
    "gpu_residency_mig_memory_used_bytes", "gpu_residency_mig_memory_total_bytes",
    "gpu_residency_mig_unattributed_memory_bytes", "gpu_residency_residual_outside_engines_bytes",
    "gpu_residency_residual_unclaimed_bytes",
}  # fmt: skip
# Series from other exporters a panel joins with; those panels are tested where that series exists
# (test_holders: the pod panel against a kube_pod_info target).
EXTERNAL = ("kube_pod_info",)
SAMPLE_VARIABLES = {"$cluster": ".*", "$node": ".*", "$gpu": ".*", "$engine": ".*", "$threshold_gib": "2",
                    "$__rate_interval": "1m", "$top": "10"}  # fmt: skip


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def panel_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, expr with the dashboard's variables replaced by sample values)."""
    queries = []
    for panel in json.loads(path.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in SAMPLE_VARIABLES.items():
                expr = expr.replace(name, value)
            # ($1 is label_replace's capture group, not a variable)
            assert not re.search(r"\$[A-Za-z_{]", expr), f"unknown variable in {panel['title']}: {expr}"
            queries.append((panel["title"], expr))
    return queries


def variable_queries(path: Path) -> list[str]:
    out = []
    for variable in json.loads(path.read_text())["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"])
            assert inner, variable["query"]
            expr = inner.group(1)
            for name, value in SAMPLE_VARIABLES.items():
                expr = expr.replace(name, value)
            out.append(expr)
    return out


def test_rules_pass_promtool_check_and_unit_tests():
    promtool = require_tool("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", str(RECORDING), str(RULES)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    for tests in ("rules.test.yaml", "alerts.test.yaml"):
        test = subprocess.run(
            [promtool, "test", "rules", str(DASHBOARDS / tests)], capture_output=True, text=True, check=False
        )
        assert test.returncode == 0, test.stdout + test.stderr


def test_every_recording_rule_has_a_unit_test():
    recorded = {r["record"] for g in yaml.safe_load(RECORDING.read_text())["groups"] for r in g["rules"]}
    tested = (DASHBOARDS / "rules.test.yaml").read_text()
    assert recorded and all(f"expr: {name}" in tested for name in recorded), recorded


def test_every_alert_has_summary_description_and_a_runbook_section():
    runbook = (ROOT / "docs" / "RUNBOOK.md").read_text()
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert len(rules) >= 8
    for rule in rules:
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        anchor = annotations["runbook_url"].rsplit("#", 1)[1]
        assert anchor == rule["alert"].lower() and f"## {rule['alert']}\n" in runbook, rule["alert"]


def test_dashboard_queries_parse_and_name_only_contract_metrics(tmp_path):
    promtool = require_tool("promtool")
    files = dashboard_files()
    assert files
    for path in files:
        queries = [expr for _, expr in panel_queries(path)] + variable_queries(path)
        # promtool parses PromQL when it checks recording rules: one rule per query.
        rules = {"groups": [{"name": "q", "rules": [{"record": f"q:{i}", "expr": e} for i, e in enumerate(queries)]}]}
        rule_file = tmp_path / f"{path.stem}.rules.yaml"
        rule_file.write_text(yaml.safe_dump(rules))
        check = subprocess.run(
            [promtool, "check", "rules", str(rule_file)], capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, check.stdout + check.stderr
        recorded = {r["record"] for g in yaml.safe_load(RECORDING.read_text())["groups"] for r in g["rules"]}
        for expr in queries:
            used = {name for name in recorded if name in expr}
            for name in used:
                expr = expr.replace(name, "")
            names = set(re.findall(r"\bgpu_residency_\w+", expr))
            assert (names or used) and names <= CONTRACT_METRICS, (path.name, expr)


def test_dashboard_variables_and_panels(tmp_path):
    dashboard = json.loads((DASHBOARDS / "gpu-residency.json").read_text())
    assert all(
        d["templating"]["list"][0]["name"] == "datasource"
        for d in map(json.loads, map(Path.read_text, dashboard_files()))
    )
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names[:5] == ["datasource", "cluster", "node", "gpu", "engine"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("threshold", "holds", "sglang", "exits", "exporter health", "holder kind", "kubernetes pod",
                  "vllm sleep level", "vllm kv cache usage", "vllm kv cache capacity", "mig devices",
                  "residual after each release, against the cycle number"):  # fmt: skip
        assert topic in titles


def test_dashboard_queries_return_data_from_a_real_prometheus(tmp_path, prometheus_factory, fake_nvml_dir):
    require_tool("cc")
    exporter = start_exporter(tmp_path, ["--demo", "--sglang.poll-interval", "0.5"], env=dict(__import__("os").environ))
    try:
        # The latency groups run every minute in production; here every group runs at the test's pace.
        paced = []
        for path in (RECORDING, RULES):
            groups = yaml.safe_load(path.read_text())
            for group in groups["groups"]:
                group.pop("interval", None)
            paced.append(tmp_path / path.name)
            paced[-1].write_text(yaml.safe_dump(groups))
        prometheus = prometheus_factory([exporter.url.removeprefix("http://")], rule_files=paced)
        prometheus.wait_for("gpu_residency_sglang_up")
        queries = [
            (title, expr)
            for path in dashboard_files()
            for title, expr in panel_queries(path)
            if not any(name in expr for name in EXTERNAL)
        ]
        queries += [("variable", expr) for path in dashboard_files() for expr in variable_queries(path)]
        # The demo's first sleep comes after a few seconds; rate() needs two samples.
        deadline = time.monotonic() + 40
        missing = queries
        while missing and time.monotonic() < deadline:
            time.sleep(1)
            missing = [(title, expr) for title, expr in missing if not prometheus.query(expr)]
        assert not missing, missing
        # Rule expressions are valid against live data too (no alert needs to fire).
        for group in yaml.safe_load(RULES.read_text())["groups"]:
            for rule in group["rules"]:
                prometheus.query(rule["expr"])
    finally:
        exporter.stop()


def test_dashboard_json_is_what_the_generator_writes(tmp_path):
    subprocess.run([sys.executable, str(DASHBOARDS / "generate.py"), "--out", str(tmp_path)], capture_output=True,
                   check=True)  # fmt: skip
    for name in ("gpu-residency.json", "gpu-residency-fleet.json"):
        assert (DASHBOARDS / name).read_text() == (tmp_path / name).read_text(), "run: python dashboards/generate.py"


def test_the_fleet_dashboard_reads_recording_rules_and_links_to_nodes():
    fleet = json.loads((DASHBOARDS / "gpu-residency-fleet.json").read_text())
    recorded = {r["record"] for g in yaml.safe_load(RECORDING.read_text())["groups"] for r in g["rules"]}
    for panel in fleet["panels"]:
        exprs = [t["expr"] for t in panel["targets"]]
        raw = [e for e in exprs if not any(name in e for name in recorded)]
        # Only cheap raw series at fleet scale: exit counters (rare), one gauge per node, and the residual
        # the exporter publishes per GPU (one series a GPU, no join: it replaced a recording rule).
        cheap = r"gpu_residency_(engine_exits_total|nvml_up|engine_up|residual_unclaimed_bytes)\b"
        assert all(re.search(cheap, e) for e in raw), raw
        if "node" in " ".join(t["legendFormat"] for t in panel["targets"]) and panel["type"] == "timeseries":
            links = panel["fieldConfig"]["defaults"].get("links", [])
            assert links and links[0]["url"].startswith("/d/gpu-residency/gpu-residency?var-node="), panel["title"]
    titles = " | ".join(p["title"] for p in fleet["panels"]).lower()
    for topic in ("outside engines", "asleep still holding", "exits by cause", "release latency by engine"):
        assert topic in titles


DEDUP = ("max without (replica) (", "max by (cluster, node) (", "max(")


def test_both_dashboards_read_the_chosen_cluster_and_the_fleet_names_it_everywhere():
    """Node names repeat across clusters (issue 27): the node dashboard shows one node of one
    cluster, the fleet the chosen clusters (several at once), each legend saying which, each link
    to a node carrying its cluster."""
    node, fleet = (
        json.loads((DASHBOARDS / name).read_text()) for name in ("gpu-residency.json", "gpu-residency-fleet.json")
    )
    for board, many in ((node, False), (fleet, True)):
        cluster = next(v for v in board["templating"]["list"] if v["name"] == "cluster")
        assert (cluster["multi"], cluster["includeAll"]) == (many, many), board["title"]
        assert board["links"][0]["includeVars"], "the link to the other dashboard carries the cluster"
        for panel in board["panels"]:
            for target in panel["targets"]:
                # Every series the panel reads is selected by cluster (kube_pod_info is joined by pod UID).
                expr = target["expr"]
                for found in re.finditer(r"\b(gpu_residency_\w+|[a-z_]+:[a-z_:0-9]+)(\{[^}]*\})?", expr):
                    assert 'cluster=~"$cluster"' in (found.group(2) or ""), (panel["title"], expr)
                    # A raw series counts an HA pair once, as the rules do (recorded ones are already deduplicated).
                    before = re.sub(r"(increase|rate)\($", "", expr[: found.start()]).rstrip()
                    raw = found.group(1).startswith("gpu_residency_")
                    assert not raw or before.endswith(DEDUP), (panel["title"], expr)
                if board is fleet:
                    assert "{{cluster}}" in target["legendFormat"], (panel["title"], target["legendFormat"])
            for link in panel["fieldConfig"]["defaults"].get("links", []):
                assert "var-cluster=${__field.labels.cluster}" in link["url"], panel["title"]
    for variable in node["templating"]["list"][2:]:
        if variable["type"] == "query":
            assert 'cluster=~"$cluster"' in variable["query"], variable["name"]
