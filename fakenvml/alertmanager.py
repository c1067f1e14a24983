"""A real Alertmanager (Debian's prometheus-alertmanager) on loopback, and a webhook receiver for it:
what the tests deliver alerts through. Alertmanager stops by its own PID; its state lives in a
directory of the caller's; `--cluster.listen-address=` (empty) keeps it off the network."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import requests

from fakenvml.fake_http import FakeHttpServer, stop_process
from fakenvml.lifetime import with_timeout
from fakenvml.prometheus import free_port


@dataclass
class AlertmanagerServer:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def stop(self) -> None:
        stop_process(self.proc, grace=20)


def start_alertmanager(binary: str, workdir: Path, config: str, lifetime: float | None = None) -> AlertmanagerServer:
    """Alertmanager with `config` (its YAML), ready to take alerts; RuntimeError with its log if not.
    `lifetime`: seconds after which it stops by itself (under timeout(1)), whatever its caller does."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "alertmanager.yml").write_text(config)
    port = free_port()
    log_path = workdir / "alertmanager.log"
    command = [binary, f"--config.file={workdir / 'alertmanager.yml'}", f"--storage.path={workdir / 'data'}",
               f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="]  # fmt: skip
    proc = subprocess.Popen(
        with_timeout(command, lifetime) if lifetime else command, stdout=log_path.open("w"), stderr=subprocess.STDOUT
    )
    server = AlertmanagerServer(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(server.url + "/-/ready", timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"alertmanager did not start:\n{log_path.read_text()[-2000:]}")


class WebhookReceiver(FakeHttpServer):
    """Alertmanager's webhook_config target: keeps every notification's alerts, in order, each
    with the `receiver` that sent it and the `path` it was posted to."""

    def __init__(self) -> None:
        self.alerts: list[dict] = []
        self._arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with receiver._arrived:
                    receiver.alerts.extend(
                        dict(alert, receiver=body.get("receiver"), path=self.path) for alert in body.get("alerts", [])
                    )
                    receiver._arrived.notify_all()
                receiver._send(self, 200, b"{}")

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(Handler, "127.0.0.1", 0, None)

    def wait_for(self, alertname: str, timeout: float = 60.0) -> list[dict]:
        """The alerts named `alertname` delivered so far, once there is one (bounded wait)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while not (found := [a for a in self.alerts if a["labels"].get("alertname") == alertname]):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {alertname} delivered in {timeout}s; got {self.alerts}")
                self._arrived.wait(left)
        return found
