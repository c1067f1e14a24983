"""Many clusters on the real remote-write path (issue 27): two exporters on one host (so one node
name) with different GPUs, cluster a scraped by an HA pair of Prometheus agents, cluster b by one,
all remote-writing to a central Prometheus that evaluates rules.yaml and alerts.yaml and sends its
alerts through a real Alertmanager, routed as the README shows, to a webhook here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml
from conftest import PROMETHEUS_LIFETIME_S, ROOT, require_tool, start_exporter

from exporter.exits import report_exit
from exporter.registry import register_engine, set_engine_state
from fakenvml import GIB, FakeGpu, Scenario
from fakenvml.alertmanager import WebhookReceiver, start_alertmanager
from fakenvml.prometheus import PrometheusServer, start_prometheus
from fakenvml.tree import start as start_tree
from gate import GateConfigError, ResidualGate, probe_max_used_gpu_mem_gb

DASHBOARDS = ROOT / "dashboards"
RULE_FILES = [DASHBOARDS / "rules.yaml", DASHBOARDS / "alerts.yaml"]
NODE = "test-node"  # what start_exporter names both nodes
# Per cluster: its cards (UUIDs and bus ids differ), GiB used on GPU 0 and 1, GiB its engine holds on GPU 0.
LIFETIME = PROMETHEUS_LIFETIME_S  # Prometheus and Alertmanager end by themselves, whatever the fixture does
CLUSTERS = {"a": ((0, 1), (10, 3), 8), "b": ((4, 5), (5, 1), 4)}  # b: nothing to alert on


def readme_block(marker: str) -> dict:
    """The README's YAML example containing `marker`: the test runs what the docs show."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return yaml.safe_load(next(block for block in blocks if marker in block))


@dataclass
class Stack:
    central: PrometheusServer
    webhook: WebhookReceiver
    scenarios: dict[str, Scenario]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, fake_nvml_dir) -> Iterator[Stack]:
    prometheus, alertmanager = require_tool("prometheus"), require_tool("prometheus-alertmanager")
    base = tmp_path_factory.mktemp("clusters")
    stoppers: list = []
    try:
        webhook = WebhookReceiver()
        stoppers.append(webhook.stop)
        routing = readme_block("alertmanager.yml")
        routing["route"]["group_wait"] = "1s"  # the README's 30 s, shortened for a test
        for receiver in routing["receivers"]:
            for hook in receiver["webhook_configs"]:
                hook["url"] = webhook.url + "/" + receiver["name"]
        manager = start_alertmanager(alertmanager, base / "alertmanager", yaml.safe_dump(routing), LIFETIME)
        stoppers.append(manager.stop)
        central = start_prometheus(
            prometheus, base / "central", [], RULE_FILES, receiver=True, alertmanager=manager.url, lifetime=LIFETIME
        )
        stoppers.append(central.stop)
        scenarios = {}
        agent = readme_block("external_labels")
        for cluster, (cards, used, engine_gib) in CLUSTERS.items():
            scenario = Scenario(base / f"{cluster}.json", [FakeGpu(index=i, card=c) for i, c in enumerate(cards)])
            registry = base / f"registry-{cluster}"
            engine = start_tree(1, max_seconds=600)
            stoppers.append(engine.stop)
            register_engine("rollout-0", root_pid=engine.pid, directory=registry)
            set_engine_state("rollout-0", "active", directory=registry)
            for gpu, gib in zip(scenario.gpus, used, strict=True):
                gpu.used = gib * GIB
            scenario.gpus[0].processes = [(engine.leaves[0], engine_gib * GIB)]
            scenario.write()
            scenarios[cluster] = scenario
            exporter = start_exporter(
                base, ["--registry.dir", str(registry), "--no-engines.discover", "--exits.grace-period", "0.5",
                       "--exits.first-zero-seconds", "10"], scenario.environ(fake_nvml_dir),
            )  # fmt: skip
            stoppers.append(exporter.stop)
            for replica in ("r1", "r2") if cluster == "a" else ("r1",):
                labels = {**agent["global"]["external_labels"], "cluster": cluster, "replica": replica}
                server = start_prometheus(
                    prometheus, base / f"agent-{cluster}-{replica}", [exporter.url.removeprefix("http://")],
                    agent=True, remote_write=central.url + "/api/v1/write", external_labels=labels, lifetime=LIFETIME,
                )  # fmt: skip
                stoppers.append(server.stop)
        central.wait_for('count(count by (cluster, replica) (gpu_residency_engine_up{engine="rollout-0"})) == 3', 90)
        # Cluster a's second engine dies by SIGKILL only now, so its exit series is seen at 0 first.
        doomed = start_tree(1, max_seconds=600)
        stoppers.append(doomed.stop)
        register_engine("doomed", root_pid=doomed.pid, directory=base / "registry-a")
        central.wait_for('gpu_residency_engine_up{engine="doomed"}', 60)
        doomed.root.kill()
        doomed.root.wait(timeout=10)
        report_exit("doomed", -9, directory=base / "registry-a")
        yield Stack(central, webhook, scenarios)
    finally:
        for stop in reversed(stoppers):
            stop()


def recorded_names() -> list[str]:
    rules = yaml.safe_load((DASHBOARDS / "rules.yaml").read_text())
    return [rule["record"] for group in rules["groups"] for rule in group["rules"]]


def by_cluster(result: list, **labels: str) -> dict[str, float]:
    """cluster -> value of the series matching `labels`; a cluster seen twice fails (a copy not deduplicated)."""
    found: dict[str, float] = {}
    for series in result:
        metric = series["metric"]
        if all(metric.get(k) == v for k, v in labels.items()):
            assert metric["cluster"] not in found, f"two series for cluster {metric['cluster']}: {result}"
            found[metric["cluster"]] = float(series["value"][1])
    return found


def test_every_recorded_series_keeps_the_clusters_apart_and_counts_an_ha_pair_once(stack):
    central = stack.central
    central.wait_for("count(count by (cluster) (node_kind:gpu_residency_holder_memory_bytes:sum)) == 2", 60)
    # Per node: used minus engine memory (a: 10 + 3 - 8, b: 5 + 1 - 4 GiB), each cluster's own, once.
    outside = {cluster: float(sum(used) - engine) * GIB for cluster, (_, used, engine) in CLUSTERS.items()}
    expected = {
        "node:gpu_residency_residual_outside_engines_bytes:sum": outside,
        "node:gpu_residency_engine_up:sum": {"a": 1.0, "b": 1.0},  # rollout-0 each; doomed is dead
    }
    for name, values in expected.items():
        deadline = time.monotonic() + 60
        while (seen := by_cluster(central.query(name), node=NODE)) != values and time.monotonic() < deadline:
            time.sleep(0.5)
        assert seen == values, (name, central.query(name))
    # The exporter's own per-GPU residual (no longer a recording rule), its HA copies folded as the rules fold them.
    outside_gpu = "max without (instance, job, replica) (gpu_residency_residual_outside_engines_bytes)"
    gpu0 = by_cluster(central.query(outside_gpu), gpu="0")
    assert gpu0 == {"a": 2.0 * GIB, "b": 1.0 * GIB}
    states = central.query("node_engine_state:gpu_residency_engine_memory_bytes:sum")
    assert by_cluster(states, engine="rollout-0", state="active") == {"a": 8.0 * GIB, "b": 4.0 * GIB}
    seen_in_both = set()
    for name in recorded_names():
        for series in central.query(name):
            labels = series["metric"]
            assert labels.get("cluster") in ("a", "b") and "replica" not in labels, (name, labels)
            assert not {"instance", "job"} & set(labels), (name, labels)
        if {s["metric"]["cluster"] for s in central.query(name)} == {"a", "b"}:
            seen_in_both.add(name)
    assert len(seen_in_both) >= 4, seen_in_both  # of the 5 not latency quantiles (which need releases)


def test_an_alert_for_cluster_a_is_delivered_with_its_cluster_and_none_fires_for_b(stack):
    delivered = stack.webhook.wait_for("GpuEngineKilled", timeout=120)
    assert {a["labels"]["cluster"] for a in delivered} == {"a"}, delivered
    assert all(a["labels"]["engine"] == "doomed" and a["labels"]["node"] == NODE for a in delivered), delivered
    assert all("replica" not in a["labels"] for a in delivered), "the HA pair's copies are one alert"
    routed = {(a["receiver"], a["path"]) for a in delivered}
    assert routed == {("cluster-a", "/cluster-a")}, "routed by cluster, as the README shows"
    firing = stack.central.query('ALERTS{alertname="GpuEngineKilled", alertstate="firing"}')
    assert [s["metric"]["cluster"] for s in firing] == ["a"], firing
    assert stack.central.query('ALERTS{cluster="b"}') == [], "nothing happened in cluster b"


def gate_cli(central: PrometheusServer, gpu: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gate", "check", "--source", "prometheus", "--prometheus-url", central.url,
         "--gpus", gpu, "--node", NODE, "--threshold-gb", "2", "--max-age", "60", *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("GPU_RESIDENCY_PROMETHEUS")},
    )  # fmt: skip


def test_the_gate_reads_one_cluster_through_a_selector_and_refuses_to_mix_two(stack, monkeypatch):
    central, a, b = stack.central, stack.scenarios["a"], stack.scenarios["b"]
    gate = ResidualGate(2, source="prometheus", prometheus_url=central.url, max_age_s=60)
    # By UUID no node name is involved: one card, its HA copies agree, no selector needed.
    verdict = gate.check([a.gpus[1].uuid], NODE).gpus[0]
    assert verdict.sample.used_bytes == 3 * GIB and verdict.reason == "over threshold", verdict.reason
    # By bus id the query asks for the node, which both clusters answer: refused, naming them.
    with pytest.raises(GateConfigError) as refused:
        gate.check([b.gpus[1].pci_bus_id], NODE)
    message = str(refused.value)
    assert "2 machines" in message and 'cluster="a"; cluster="b"' in message and "replica" not in message, message
    cli = gate_cli(central, b.gpus[1].pci_bus_id)
    assert cli.returncode == 2 and 'cluster="a"' in cli.stderr and 'cluster="b"' in cli.stderr, cli.stderr

    for cluster, scenario, clear in (("a", a, False), ("b", b, True)):
        selected = ResidualGate(2, source="prometheus", prometheus_url=central.url, max_age_s=60,
                                prometheus_selector=f'cluster="{cluster}"')  # fmt: skip
        decision = selected.check([scenario.gpus[1].pci_bus_id], NODE)
        assert decision.ok is clear and decision.gpus[0].sample.uuid == scenario.gpus[1].uuid, decision.explain()
        cli = gate_cli(central, scenario.gpus[1].pci_bus_id, "--prometheus-selector", f"cluster='{cluster}'")
        assert cli.returncode == (0 if clear else 1), cli.stdout + cli.stderr
    other = ResidualGate(2, source="prometheus", prometheus_url=central.url, prometheus_selector='cluster="a"')
    assert other.check([b.gpus[1].pci_bus_id], NODE).gpus[0].reason == "no sample for this GPU", "b is not read"

    # The RLix drop-in takes the selector from the environment.
    monkeypatch.setenv("GPU_RESIDENCY_GATE_SOURCE", "prometheus")
    monkeypatch.setenv("GPU_RESIDENCY_PROMETHEUS_URL", central.url)
    monkeypatch.setenv("GPU_RESIDENCY_GATE_MAX_AGE_S", "60")
    assert probe_max_used_gpu_mem_gb([b.gpus[0].pci_bus_id], node=NODE) is None, "two machines: cannot measure"
    monkeypatch.setenv("GPU_RESIDENCY_PROMETHEUS_SELECTOR", 'cluster="b"')
    assert probe_max_used_gpu_mem_gb([b.gpus[0].pci_bus_id], node=NODE) == 5.0


@pytest.mark.parametrize(
    "selector",
    ['cluster="a"} or vector(1) or {x="', "cluster=a", '{cluster="a"}', '__name__="up"', 'cluster="a" region="b"',
     'cluster="a\\q"', 'up{cluster="a"}', 'cluster="a",,x="b"'],
)  # fmt: skip
def test_a_selector_is_label_matchers_only(selector):
    with pytest.raises(GateConfigError, match="must be label matchers"):
        ResidualGate(2, source="prometheus", prometheus_url="http://127.0.0.1:9", prometheus_selector=selector)
    cli = subprocess.run(
        [sys.executable, "-m", "gate", "check", "--source", "prometheus", "--prometheus-url", "http://127.0.0.1:9",
         "--gpus", "GPU-0", "--prometheus-selector", selector],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert cli.returncode == 2 and "must be label matchers" in cli.stderr, cli.stderr


def test_the_selector_from_the_environment_is_checked_too(monkeypatch):
    monkeypatch.setenv("GPU_RESIDENCY_PROMETHEUS_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("GPU_RESIDENCY_PROMETHEUS_SELECTOR", 'cluster="a"} or {')
    with pytest.raises(GateConfigError, match="must be label matchers"):
        ResidualGate.from_env(source="prometheus")
    monkeypatch.setenv("GPU_RESIDENCY_PROMETHEUS_SELECTOR", ' cluster="a", region=~"eu-.*" ')
    assert ResidualGate.from_env(source="prometheus").source.selector == 'cluster="a", region=~"eu-.*"'
