"""Shared fixtures: the fake NVML, real process trees, and the exporter as a real process."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import fakenvml
from fakenvml import Scenario
from fakenvml.prometheus import PrometheusServer, start_prometheus
from fakenvml.tree import Tree
from fakenvml.tree import start as start_tree

ROOT = Path(__file__).resolve().parent.parent
# CI sets this so that a missing system tool fails the suite instead of skipping.
REQUIRE_TOOLS = os.environ.get("GPU_RESIDENCY_REQUIRE_TOOLS") == "1"


def require_tool(name: str) -> str:
    """Path of a system binary; skip without it, or fail when CI requires every tool."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed (Debian: apt-get install -y {'prometheus' if 'prom' in name else name})"
        if REQUIRE_TOOLS:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def fake_nvml_dir(tmp_path_factory) -> Path:
    require_tool("cc")
    return fakenvml.build(tmp_path_factory.mktemp("fakenvml"))


@pytest.fixture
def scenario(tmp_path) -> Scenario:
    s = Scenario.with_gpus(tmp_path / "scenario.json", 2)
    s.write()
    return s


@pytest.fixture
def spawn_tree() -> Iterator:
    """Real process trees (root -> child -> leaves) stopped after the test."""
    trees: list[Tree] = []

    def spawn(leaves: int = 1, depth: int = 2, title: str = "sglang::scheduler") -> Tree:
        trees.append(start_tree(leaves, depth, title, max_seconds=300))
        return trees[-1]

    yield spawn
    for tree in trees:
        tree.stop()


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Family name -> [(labels, value)] using prometheus_client's own text parser."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def values(metrics: dict, name: str, **labels: str) -> list[float]:
    """Values of the samples of `name` whose labels include `labels`."""
    return [v for lbl, v in metrics.get(name, []) if all(lbl.get(k) == str(w) for k, w in labels.items())]


def one(metrics: dict, name: str, **labels: str) -> float:
    found = values(metrics, name, **labels)
    assert len(found) == 1, f"expected one {name}{labels}, found {found}"
    return found[0]


@dataclass
class ExporterProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path
    args: list[str] = field(default_factory=list)

    def scrape(self) -> dict:
        response = requests.get(self.url + "/metrics", timeout=10)
        response.raise_for_status()
        return parse_metrics(response.text)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


LISTENING = re.compile(r"listening on (https?://[^/\s]+)")


def start_exporter(
    tmp_path: Path, args: list[str], env: dict[str, str], timeout: float = 30.0, wrapper: list[str] = ()
) -> ExporterProcess:
    """Run `python -m exporter` on a free loopback port and wait until it serves."""
    log_path = tmp_path / f"exporter-{time.monotonic_ns()}.log"
    handle = log_path.open("w")
    log_path.chmod(0o666)  # an exporter run as another user (wrapper) writes it too
    full = [
        *wrapper,
        sys.executable,
        "-m",
        "exporter",
        "--web.listen-address",
        "127.0.0.1:0",
        "--node",
        "test-node",
        *args,
    ]
    proc = subprocess.Popen(full, stdout=handle, stderr=subprocess.STDOUT, env=dict(env, PYTHONPATH=str(ROOT)))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = LISTENING.search(log_path.read_text())
        if match:
            return ExporterProcess(proc, match.group(1), log_path, full)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"exporter did not start:\n{log_path.read_text()}")


@pytest.fixture
def exporter_factory(tmp_path, fake_nvml_dir) -> Iterator:
    started: list[ExporterProcess] = []

    def factory(scenario: Scenario | None, *args: str, env: dict[str, str] | None = None) -> ExporterProcess:
        environ = scenario.environ(fake_nvml_dir) if scenario else dict(os.environ)
        environ.update(env or {})
        exporter = start_exporter(tmp_path, list(args), environ)
        started.append(exporter)
        return exporter

    yield factory
    for exporter in started:
        exporter.stop()


@dataclass
class LocalExporter:
    """The exporter's collector in this process, on the fake NVML: fast and fully real below HTTP."""

    collector: object
    registry_dir: Path
    errors: object

    def scrape(self) -> dict:
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        return parse_metrics(generate_latest(registry).decode())


@pytest.fixture
def local_exporter(tmp_path, fake_nvml_dir, scenario, monkeypatch) -> LocalExporter:
    """The CLI's own assembly (build_exporter), in-process; background workers are not started."""
    from exporter.cli import build_exporter, build_parser
    from exporter.errors import ErrorCounter

    monkeypatch.setenv("FAKE_NVML_SCENARIO", str(scenario.path))
    registry_dir = tmp_path / "engines"
    args = build_parser().parse_args(
        ["--node", "test-node", "--registry.dir", str(registry_dir), "--no-engines.discover",
         "--collection.min-interval", "0",
         "--nvml.library", str(fake_nvml_dir / fakenvml.SONAME)]
    )  # fmt: skip
    errors = ErrorCounter()
    return LocalExporter(build_exporter(args, errors).collector, registry_dir, errors)


@pytest.fixture
def prometheus_factory(tmp_path) -> Iterator:
    binary = require_tool("prometheus")
    started: list[PrometheusServer] = []

    def factory(targets: list[str], rule_files: list[Path] = (), interval: str = "1s") -> PrometheusServer:
        server = start_prometheus(binary, tmp_path / f"prometheus-{len(started)}", targets, rule_files, interval)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
