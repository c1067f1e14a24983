"""The exporter as a real process over real HTTP: endpoints, contract, lint, no-GPU start."""

from __future__ import annotations

import subprocess
import sys

import requests
from conftest import ROOT, one, require_tool, scrape_until, values

from exporter.registry import register_engine
from fakenvml import GIB, LIBRARY_NOT_FOUND

CONTRACT = {
    "gpu_residency_memory_used_bytes": {"node", "gpu", "uuid", "pci_bus_id", "model"},
    "gpu_residency_memory_total_bytes": {"node", "gpu", "uuid", "pci_bus_id", "model"},
    "gpu_residency_memory_reserved_bytes": {"node", "gpu", "uuid", "pci_bus_id", "model"},
    "gpu_residency_process_memory_bytes": {
        "node",
        "gpu",
        "uuid",
        "pid",
        "comm",
        "engine",
        "container_id",
        "pod_uid",
        "holder",
        "holder_kind",
        "mig_instance",  # "" on a whole GPU: Prometheus stores no empty label, the series is unchanged
        "mig_uuid",
    },
    "gpu_residency_holder_memory_bytes": {"node", "gpu", "uuid", "holder", "kind", "pod_uid"},
    "gpu_residency_engine_memory_bytes": {"node", "engine", "gpu", "uuid", "mig_instance", "mig_uuid"},
    "gpu_residency_unattributed_memory_bytes": {"node", "gpu", "uuid"},
    "gpu_residency_engine_up": {"node", "engine", "kind"},
    "gpu_residency_nvml_up": {"node"},
    "gpu_residency_scrape_duration_seconds": {"node"},
    "gpu_residency_errors_total": {"node", "source", "reason"},
    "gpu_residency_build_info": {"node", "version"},
    "gpu_residency_collections_total": {"node"},
    "gpu_residency_collector_success": {"node", "collector"},
    "gpu_residency_forensics_evidence_available": {"node", "source"},
    "gpu_residency_forensics_history_collections": {"node"},
    "gpu_residency_forensics_watched_processes": {"node", "engine"},
    "gpu_residency_collector_duration_seconds": {"node", "collector"},
    "gpu_residency_engine_release_floor_bytes": {"node"},
    "gpu_residency_residual_outside_engines_bytes": {"node", "gpu", "uuid"},
    "gpu_residency_residual_unclaimed_bytes": {"node", "gpu", "uuid"},
}


def test_scrape_over_http_matches_the_contract(exporter_factory, scenario, spawn_tree, tmp_path):
    tree = spawn_tree(leaves=2)
    registry = tmp_path / "engines"
    register_engine("rollout-0", root_pid=tree.pid, directory=registry)
    scenario.gpus[0].processes = [(tree.leaves[0], 3 * GIB)]
    scenario.gpus[1].processes = [(tree.leaves[1], 4 * GIB)]
    scenario.gpus[0].used, scenario.gpus[1].used = 3 * GIB, 5 * GIB
    scenario.write()
    exporter = exporter_factory(scenario, "--registry.dir", str(registry), "--no-engines.discover")

    # Once the engine's tree is watched (the background watcher's first step): every family is there.
    m = scrape_until(exporter, lambda m: "gpu_residency_forensics_watched_processes" in m)

    for name, labels in CONTRACT.items():
        # errors_total has samples only once something failed
        assert name in m or name == "gpu_residency_errors_total", f"{name} missing"
        for sample_labels, _ in m.get(name, []):
            assert set(sample_labels) == labels, (name, sample_labels)
    assert {n for n in m if n.startswith("gpu_residency_")} <= set(CONTRACT) | {
        "gpu_residency_errors_created",
        "gpu_residency_collections_created",
    }
    assert not [n for n in m if n.startswith(("process_", "python_"))], "default collectors must be off"
    # The residuals the fleet reads, from the exporter: GPU 1's 5 GiB less the engine's 4 GiB.
    outside = {labels["gpu"]: v for labels, v in m["gpu_residency_residual_outside_engines_bytes"]}
    assert (outside["0"], outside["1"]) == (0, 1 * GIB)
    assert one(m, "gpu_residency_engine_memory_bytes", engine="rollout-0", gpu=1) == 4 * GIB
    assert one(m, "gpu_residency_unattributed_memory_bytes", gpu=1) == GIB
    assert one(m, "gpu_residency_nvml_up", node="test-node") == 1


def test_promtool_accepts_the_exposition(exporter_factory, scenario, spawn_tree, tmp_path):
    promtool = require_tool("promtool")
    tree = spawn_tree()
    register_engine("e", root_pid=tree.pid, directory=tmp_path / "engines")
    scenario.gpus[0].processes = [(tree.leaves[0], GIB)]
    scenario.write()
    exporter = exporter_factory(scenario, "--registry.dir", str(tmp_path / "engines"))
    body = requests.get(exporter.url + "/metrics", timeout=10).text
    lint = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_landing_health_and_unknown_paths(exporter_factory, scenario):
    exporter = exporter_factory(scenario, "--web.telemetry-path", "/custom")
    landing = requests.get(exporter.url + "/", timeout=10)
    assert landing.status_code == 200 and 'href="/custom"' in landing.text
    assert requests.get(exporter.url + "/healthz", timeout=10).text == "ok\n"
    assert requests.get(exporter.url + "/nope", timeout=10).status_code == 404
    assert "gpu_residency_memory_used_bytes" in requests.get(exporter.url + "/custom", timeout=10).text


def test_without_nvml_it_serves_processes_and_engines_and_says_why_once(
    exporter_factory, scenario, spawn_tree, tmp_path
):
    tree = spawn_tree()
    register_engine("e", root_pid=tree.pid, directory=tmp_path / "engines")
    scenario.init_error = LIBRARY_NOT_FOUND
    scenario.write()
    exporter = exporter_factory(scenario, "--registry.dir", str(tmp_path / "engines"))

    for _ in range(3):
        m = exporter.scrape()
    assert one(m, "gpu_residency_nvml_up") == 0
    assert one(m, "gpu_residency_engine_up", engine="e") == 1
    assert values(m, "gpu_residency_memory_used_bytes") == []
    assert one(m, "gpu_residency_errors_total", source="nvml", reason="library_not_found") >= 1
    assert exporter.log().count("NVML unavailable") == 1


def test_without_any_nvml_library_it_still_serves(exporter_factory, tmp_path):
    exporter = exporter_factory(
        None, "--nvml.library", str(tmp_path / "missing" / "libnvidia-ml.so.1"), "--registry.dir", str(tmp_path)
    )
    m = exporter.scrape()
    assert one(m, "gpu_residency_nvml_up") == 0
    assert "cannot load" in exporter.log()


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )


def test_bad_flags_are_clear_errors_not_tracebacks(tmp_path):
    bad_config = tmp_path / "engines.toml"
    bad_config.write_text("[[engines]]\nname = 'x'\n")
    cases = [
        (["--web.listen-address", "nonsense"], "expected host:port"),
        (["--web.telemetry-path", "metrics"], "must start with /"),
        (["--engines.discovery-interval", "-1"], "must be > 0"),
        (["--engines.config-file", str(bad_config)], "exactly one of pid_file or root_pid"),
        (["--engines.config-file", str(tmp_path / "absent.toml")], "cannot read"),
    ]
    for args, message in cases:
        result = _run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_port_in_use_is_a_clear_error(exporter_factory, scenario):
    exporter = exporter_factory(scenario)
    address = exporter.url.removeprefix("http://")
    result = _run_cli("--web.listen-address", address)
    assert result.returncode == 1
    assert "cannot listen on" in result.stderr and "Traceback" not in result.stderr


def test_help_answers_the_usual_questions():
    out = _run_cli("--help").stdout
    for flag in ("--web.listen-address", "--web.telemetry-path", "--log.level", "--registry.dir", "--demo", "hostPID"):
        assert flag in out


def test_own_text_encoder_matches_prometheus_client(local_exporter, scenario, spawn_tree):
    """exporter.web.exposition writes what prometheus_client's encoder writes, hostile values included."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.parser import text_string_to_metric_families

    from exporter.web.exposition import Exposition, render

    tree = spawn_tree()
    register_engine("e", root_pid=tree.pid, directory=local_exporter.registry_dir)
    scenario.gpus[0].processes = [(tree.leaves[0], GIB)]
    scenario.write()
    hostile = GaugeMetricFamily("x_hostile", "help with \\ and\nnewline", labels=["v"])
    hostile.add_metric(
        [
            'a "quoted" \\ back\nslash',
        ],
        1.5,
    )
    families = [*local_exporter.collector.collect(), hostile]

    class Fixed:
        def collect(self):
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())

    def parsed(text: str) -> list:
        return sorted(
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        )

    assert parsed(render(families).decode()) == parsed(generate_latest(registry).decode())
    # What the server's Exposition remembers from one scrape writes the next one the same, and a
    # value or label that changed is written anew.
    exposition = Exposition()
    assert exposition.render(families) == exposition.render(families) == render(families)
    changed = GaugeMetricFamily("x_hostile", "help with \\ and\nnewline", labels=["v"])
    changed.add_metric(['a "quoted" \\ back\nslash'], 2.5)
    changed.add_metric(["other"], 1.5)
    text = exposition.render([changed]).decode()
    hostile_value = 'a "quoted" \\ back\nslash'
    assert parsed(text) == [("x_hostile", (("v", hostile_value),), 2.5), ("x_hostile", (("v", "other"),), 1.5)]
