"""A real Prometheus (Debian's package) on loopback, scraping given targets: for tests and
benchmarks. Stops by its own PID; its data lives in a directory of the caller's."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from fakenvml.fake_http import stop_process
from fakenvml.lifetime import with_timeout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PrometheusServer:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def query(self, promql: str) -> list:
        response = requests.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10)
        payload = response.json()
        if payload.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {payload}")
        return payload["data"]["result"]

    def wait_for(self, promql: str, timeout: float = 30.0) -> list:
        """Poll (bounded) until the query returns data; Prometheus needs ~5 s to its first sample."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(promql)
            if result:
                return result
            time.sleep(0.25)
        raise TimeoutError(f"no data for {promql} after {timeout}s:\n{self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        stop_process(self.proc, grace=20)


def start_prometheus(
    binary: str,
    workdir: Path,
    targets: list[str],
    rule_files: list[Path] = (),
    interval: str = "1s",
    *,
    agent: bool = False,
    remote_write: str | None = None,
    external_labels: dict[str, str] | None = None,
    receiver: bool = False,
    alertmanager: str | None = None,
    lifetime: float | None = None,
) -> PrometheusServer:
    """A Prometheus scraping `targets` (none: it only receives). `agent`: agent mode (scrape and
    remote_write, no queries, no rules), as a cluster's collector in front of a central store;
    `remote_write`: the URL it sends everything to, with `external_labels`; `receiver`: it
    accepts remote_write (--web.enable-remote-write-receiver), as a central store does;
    `alertmanager`: the URL its alerts go to; `lifetime`: seconds after which it stops by itself
    (under timeout(1)), whatever its caller does."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    lines = [f"global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n"]
    if external_labels:
        lines.append("  external_labels:\n" + "".join(f"    {k}: '{v}'\n" for k, v in external_labels.items()))
    if not agent:
        rules_yaml = "".join(f"\n  - '{p}'" for p in rule_files)
        lines.append(f"rule_files:{rules_yaml or ' []'}\n")
    if alertmanager:
        host = alertmanager.split("//")[-1]
        lines.append(f"alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{host}']\n")
    if targets:
        targets_yaml = ", ".join(f"'{t}'" for t in targets)
        lines.append(
            f"scrape_configs:\n  - job_name: gpu-residency\n    static_configs:\n      - targets: [{targets_yaml}]\n"
        )
    if remote_write:
        # Sent at once, a few samples at a time: tests and the gate read the store seconds later.
        lines.append(f"remote_write:\n  - url: '{remote_write}'\n    queue_config:\n      batch_send_deadline: 1s\n")
    config.write_text("".join(lines))
    port = free_port()
    log_path = workdir / "prometheus.log"
    storage = (
        ["--enable-feature=agent", f"--storage.agent.path={workdir / 'wal'}"]
        if agent
        else [f"--storage.tsdb.path={workdir / 'data'}", "--storage.tsdb.retention.time=1h"]
    )
    command = [binary, f"--config.file={config}", *storage, f"--web.listen-address=127.0.0.1:{port}",
               *(["--web.enable-remote-write-receiver"] if receiver else [])]  # fmt: skip
    proc = subprocess.Popen(
        with_timeout(command, lifetime) if lifetime else command,
        stdout=log_path.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = PrometheusServer(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(server.url + "/-/ready", timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"prometheus did not start:\n{log_path.read_text()[-2000:]}")
