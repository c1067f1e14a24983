"""Every client of the exporter (the gate's source, the miles evidence call, `gpu-residency-exporter
exits`) reaches it with the same settings: through TLS and basic auth, from the environment or
arguments, within the documented time."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time

import bcrypt
import pytest
from conftest import ROOT, visible_devices

from exporter.exits import EngineExitedError, exporter_evidence, wait_server_healthy
from exporter.exits.report import EVIDENCE_WAIT_S
from exporter.registry import register_engine
from gate import ResidualGate
from gpu_residency_common.exporter_client import (
    CA_FILE_ENV,
    PASSWORD_ENV,
    PASSWORD_FILE_ENV,
    URL_ENV,
    USER_ENV,
    ExporterClient,
    ExporterError,
)

SETTINGS = (URL_ENV, CA_FILE_ENV, USER_ENV, PASSWORD_ENV, PASSWORD_FILE_ENV)


@pytest.fixture
def clean_env(monkeypatch):
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _evidence(engine: str, since: float, timeout: float = 30.0) -> dict:
    """exporter_evidence until the exporter has the exit (it holds an exit a few seconds for its evidence)."""
    deadline = time.monotonic() + timeout
    while (record := exporter_evidence(engine, since)) is None:
        assert time.monotonic() < deadline, f"no evidence for {engine} in {timeout}s"
    return record


def test_every_client_gets_through_tls_and_basic_auth(
    exporter_factory, scenario, tls_files, tmp_path, clean_env, caplog
):
    cert, key = tls_files
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(
        f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\nbasic_auth_users:\n  miles: '{hashed}'\n"
    )
    registry = tmp_path / "engines"
    exporter = exporter_factory(scenario, "--web.config.file", str(config), "--registry.dir", str(registry))
    clean_env.setenv("NVIDIA_VISIBLE_DEVICES", visible_devices(scenario))  # the gate sees the node's GPUs
    assert exporter.url.startswith("https://")
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    engine = subprocess.Popen([sys.executable, "-c", "import os, time; time.sleep(1); os.kill(os.getpid(), 9)"])
    register_engine("rollout-0", root_pid=engine.pid, directory=registry)
    since = time.time()
    for name, value in ((URL_ENV, exporter.url), (CA_FILE_ENV, str(cert)), (USER_ENV, "miles")):
        clean_env.setenv(name, value)
    clean_env.setenv(PASSWORD_FILE_ENV, str(password))

    with pytest.raises(EngineExitedError, match="exitcode=-9"):  # miles' call: records the exit, asks for evidence
        wait_server_healthy("http://127.0.0.1:9", engine, timeout=60, engine="rollout-0", directory=registry)
    record = _evidence("rollout-0", since)
    assert record["engine"] == "rollout-0" and record["exitcode"] == -9

    cli = [sys.executable, "-m", "exporter", "exits", "--engine", "rollout-0"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    shown = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert shown.returncode == 0 and "rollout-0  exitcode=-9" in shown.stdout, shown.stderr
    assert ResidualGate.from_env(threshold_gb=100).check([0]).ok, "the gate's source, from the same settings"

    clean_env.delenv(PASSWORD_FILE_ENV)
    flags = ["--url", exporter.url, "--ca-file", str(cert), "--user", "miles", "--password-file", str(password)]
    env = {k: v for k, v in env.items() if k not in SETTINGS}
    shown = subprocess.run([*cli, *flags], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert shown.returncode == 0 and "rollout-0  exitcode=-9" in shown.stdout, "flags instead of the environment"
    for drop, expected in ((USER_ENV, "HTTP 401"), (CA_FILE_ENV, "CERTIFICATE_VERIFY_FAILED")):
        clean_env.setenv(PASSWORD_ENV, "s3cret")
        clean_env.delenv(drop)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="exporter.exits"):
            assert exporter_evidence("rollout-0", since) is None
        assert expected in caplog.text, "says why, never raises"
        shown = subprocess.run(cli, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                               timeout=60, check=False)  # fmt: skip
        assert shown.returncode == 1 and expected in shown.stderr and "Traceback" not in shown.stderr
        clean_env.setenv(drop, {USER_ENV: "miles", CA_FILE_ENV: str(cert)}[drop])


def test_the_evidence_wait_is_bounded_all_told(clean_env):
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does) and never answers
    try:
        started = time.monotonic()
        assert exporter_evidence("rollout-0", 0.0, f"http://127.0.0.1:{listener.getsockname()[1]}") is None
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    assert EVIDENCE_WAIT_S <= 5 and elapsed < EVIDENCE_WAIT_S + 0.5, elapsed
    assert f"waiting at most {EVIDENCE_WAIT_S:g} s" in (ROOT / "README.md").read_text(), "the README's figure"


@pytest.mark.parametrize(
    "url, options, message",
    [
        (None, {}, f"no exporter URL (give one, or set ${URL_ENV})"),
        ("ftp://x", {}, "not an http(s) base URL"),
        ("http://x:9852", {"ca_file": "/ca.pem"}, "not https"),
        ("https://x:9852", {"ca_file": "/does/not/exist"}, "cannot use CA file"),
        ("http://x:9852", {"username": "u"}, "without a password"),
        ("http://x:9852", {"password_file": "/does/not/exist", "username": "u"}, "cannot read the password file"),
        ("http://x:9852", {"password": "p"}, "without a user"),
    ],
)
def test_settings_that_cannot_work_are_clear_errors(url, options, message, clean_env):
    with pytest.raises(ExporterError, match=re.escape(message)):
        ExporterClient(url, **options)


def test_a_bad_exits_setting_is_a_usage_error_not_a_traceback(clean_env):
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "exits", "--url", "http://x:9852", "--ca-file", "/ca.pem"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "not https" in result.stderr and "Traceback" not in result.stderr
