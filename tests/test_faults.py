"""Hostile files, hung drivers, dead threads: each failure a review found, held by a test that failed before
the fix (docs/RELIABILITY.md lists them)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time

import bcrypt
import pytest
import requests
from conftest import ROOT, build_local, one, polled, scrape_families, values

import fakenvml
from exporter.errors import ErrorCounter
from exporter.exits import report_exit
from exporter.pollers.url_policy import UrlPolicy
from exporter.registry import register_engine, set_engine_state
from exporter.supervisor import run_supervised
from fakenvml import GIB, NOT_SUPPORTED
from gate import GateConfigError, ResidualGate, probe_max_used_gpu_mem_gb
from gate.nvml_source import NvmlSource as GateNvmlSource
from gate.readings import GpuSample
from gpu_residency_common.files import UntrustedFileError, append_record, parse_json, read_untrusted

DEEP = "[" * 5000 + "]" * 5000


def _wait_for(predicate, timeout: float = 15.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"not true within {timeout}s")


# ---------- one bad file costs its own series and a counter, never the scrape ----------


def test_deeply_nested_json_is_refused_not_a_recursion_error(local_exporter, spawn_tree):
    registry = local_exporter.registry_dir
    tree = spawn_tree()
    register_engine("good", root_pid=tree.pid, directory=registry)
    (registry / "deep.json").write_text('{"name": "deep", "root_pid": 1, "x": ' + DEEP + "}")
    (registry / "gate").mkdir()
    (registry / "gate" / "good.json").write_text(DEEP)
    with pytest.raises(UntrustedFileError, match="nested"):
        parse_json(DEEP)

    m = local_exporter.scrape()

    assert one(m, "gpu_residency_engine_up", engine="good") == 1
    assert values(m, "gpu_residency_engine_up", engine="deep") == []
    assert one(m, "gpu_residency_errors_total", source="registry", reason="malformed") == 1
    assert one(m, "gpu_residency_errors_total", source="gate_records", reason="malformed") == 1
    assert one(m, "gpu_residency_nvml_up") == 1


def test_a_huge_url_in_an_entry_is_refused_and_an_unreported_death_never_breaks_the_scrape(
    local_exporter, spawn_tree, tmp_path, fake_nvml_dir
):
    registry = local_exporter.registry_dir
    huge = spawn_tree()
    register_engine("huge", root_pid=huge.pid, directory=registry)
    entry = json.loads((registry / "huge.json").read_text())
    (registry / "huge.json").write_text(json.dumps(dict(entry, url="http://127.0.0.1:1" + "/" * 5000)))
    dying = spawn_tree()
    register_engine("dying", root_pid=dying.pid, url="http://127.0.0.1:1" + "/" * 2000, directory=registry)
    dying.root.kill()
    dying.root.wait()
    exporter = build_local(
        local_exporter.registry_dir, tmp_path / "state", fake_nvml_dir, "--exits.grace-period", "0.01"
    )
    exporter.scrape()
    time.sleep(0.05)
    m = exporter.scrape()
    assert values(m, "gpu_residency_engine_up", engine="huge") == []
    assert one(m, "gpu_residency_errors_total", source="registry", reason="malformed") == 1
    assert one(m, "gpu_residency_engine_exits_total", engine="dying", exit_code="unknown") == 1
    assert one(m, "gpu_residency_collector_success", collector="exits") == 1


def test_a_failing_concern_loses_only_its_own_families(local_exporter, monkeypatch):
    concerns = local_exporter.collector._concerns
    broken = [(name, (lambda snapshot: (_ for _ in ()).throw(RecursionError("deep"))) if name == "exits" else source)
              for name, source in concerns]  # fmt: skip
    monkeypatch.setattr(local_exporter.collector, "_concerns", broken)
    m = local_exporter.scrape()
    assert one(m, "gpu_residency_collector_success", collector="exits") == 0
    assert one(m, "gpu_residency_collector_success", collector="gpu") == 1
    assert "gpu_residency_engine_exits_total" not in m
    assert values(m, "gpu_residency_memory_used_bytes")
    assert one(m, "gpu_residency_errors_total", source="exits", reason="exception") == 1


def test_an_unexpected_failure_of_the_whole_response_is_a_500():
    from exporter.web.server import ExporterServer

    def broken(request):
        raise RuntimeError("boom")

    server = ExporterServer(broken, "127.0.0.1", 0)
    server.start()
    try:
        response = requests.get(f"http://127.0.0.1:{server.address[1]}/metrics", timeout=10)
        assert response.status_code == 500 and response.text == "internal error\n"
    finally:
        server.stop()


def test_fifos_symlinks_and_swaps_never_block_or_widen_a_read(local_exporter, tmp_path):
    registry = local_exporter.registry_dir
    (registry / "gate").mkdir(parents=True)
    os.mkfifo(registry / "gate" / "fifo-engine.json")
    os.mkfifo(registry / "fifo.json")
    huge = tmp_path / "huge.json"
    huge.write_text(" " * (10 * 1024 * 1024))
    (registry / "link.json").symlink_to(huge)
    register_engine("fifo-engine", root_pid=os.getpid(), directory=registry)
    started = time.monotonic()
    m = local_exporter.scrape()
    assert time.monotonic() - started < 5, "a FIFO is never opened for a blocking read"
    assert one(m, "gpu_residency_errors_total", source="gate_records", reason="refused") == 1
    assert one(m, "gpu_residency_errors_total", source="registry", reason="refused") == 2
    # The size cap is checked on the opened descriptor: a file swapped for a symlink is refused,
    # not followed to a file of any size.
    with pytest.raises(UntrustedFileError) as caught:
        read_untrusted(registry / "link.json", 64 * 1024)
    assert caught.value.reason == "refused"


def test_events_file_that_is_a_symlink_is_never_appended_to(tmp_path):
    registry = tmp_path / "reg"
    registry.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (registry / "events.jsonl").symlink_to(victim)
    with pytest.raises(UntrustedFileError):
        report_exit("e", -9, directory=registry)
    assert victim.read_text() == "precious\n"
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UntrustedFileError):
        append_record(tmp_path / "fifo", b"x\n")  # no reader: refused at once, not blocked


# ---------- background threads are supervised ----------


def test_a_failing_background_step_is_logged_counted_and_the_next_goes_on(caplog):
    """What the watcher thread does with each step (exporter/watcher.py): a failure costs that step only."""
    errors = ErrorCounter()
    calls = []

    def step():
        calls.append(1)
        if len(calls) < 3:
            raise RecursionError("maximum recursion depth exceeded")

    assert [run_supervised("watcher", step, errors) for _ in range(5)] == [False, False, True, True, True]
    assert errors.snapshot()[("watcher", "exception")] == 2
    assert "watcher failed" in caplog.text


def test_a_deeply_nested_server_info_is_counted_and_polling_goes_on(fake_sglang):
    from test_sglang import engine, new_poller

    deep, good = fake_sglang("deep"), fake_sglang("new")
    errors = ErrorCounter()
    poller = new_poller(errors)
    engines = [engine("deep", deep.url), engine("good", good.url)]
    m = polled(poller, *engines)
    assert one(m, "gpu_residency_sglang_up", engine="deep") == 0
    assert errors.snapshot()[("sglang", "bad_json")] == 1
    time.sleep(0.25)
    m = polled(poller, *engines)
    assert one(m, "gpu_residency_sglang_up", engine="good") == 1
    assert len(good.requests) == 2, "the poller went on"


def test_trickling_headers_cannot_hold_a_poll_past_its_deadline(fake_sglang):
    from test_sglang import engine, new_poller

    slow, good = fake_sglang("trickle_headers"), fake_sglang("new")
    errors = ErrorCounter()
    poller = new_poller(errors, read_timeout=1.0)
    engines = [engine("slow", slow.url), engine("good", good.url)]
    scrape_families(poller, *engines)
    started = time.monotonic()
    poller.poll_once()
    assert time.monotonic() - started < 3.5, "connect 1 s + read 1 s, then the socket is shut"
    m = scrape_families(poller, *engines)
    assert one(m, "gpu_residency_sglang_up", engine="slow") == 0
    assert one(m, "gpu_residency_sglang_up", engine="good") == 1
    assert errors.snapshot()[("sglang", "timeout")] == 1


def test_a_stalled_poller_withdraws_its_results(fake_sglang):
    from test_sglang import engine, new_poller

    server = fake_sglang("new")
    errors = ErrorCounter()
    poller = new_poller(errors)
    e = engine("e", server.url)
    assert one(polled(poller, e), "gpu_residency_sglang_up", engine="e") == 1
    entered, release = threading.Event(), threading.Event()
    poller._start_due = lambda: (entered.set(), release.wait(30))  # its loop's look hangs
    try:
        poller.start()
        assert entered.wait(10)
        poller._due_at = time.monotonic() - 60  # and it was due a minute ago
        assert values(scrape_families(poller, e), "gpu_residency_sglang_up") == [], "stale is not data"
        assert errors.snapshot()[("sglang", "stalled")] >= 1
    finally:
        poller.stop()
        release.set()


def test_a_re_registered_engine_inherits_no_backoff(fake_sglang):
    from test_sglang import new_poller

    from exporter.engines.catalog import Engine

    bad = fake_sglang("status500")
    poller = new_poller()

    def incarnation(start: int) -> Engine:
        return Engine("e", "sglang", bad.url, "registry", 10, start, True, registered_at=float(start))

    scrape_families(poller, incarnation(1))
    for _ in range(4):  # four failures: the next poll is 0.2 * 2**3 = 1.6 s away
        poller.poll_once()
        time.sleep(0.25)
    before = len(bad.requests)
    scrape_families(poller, incarnation(2))  # the same name, a new process
    poller.poll_once()
    assert len(bad.requests) == before + 1, "polled at once, not after the old engine's backoff"


def test_the_exporter_exits_promptly_while_an_engine_and_nvml_hang(exporter_factory, scenario, fake_sglang,
                                                                    spawn_tree, tmp_path):  # fmt: skip
    hanging = fake_sglang("hang")
    tree = spawn_tree()
    register_engine("h", root_pid=tree.pid, url=hanging.url, directory=tmp_path / "reg")
    exporter = exporter_factory(scenario, "--registry.dir", str(tmp_path / "reg"), "--sglang.poll-interval", "0.2",
                                "--nvml.timeout", "0.5")  # fmt: skip
    _wait_for(lambda: hanging.requests)
    scenario.gpus[0].hangs = {"memory"}
    scenario.write()
    exporter.scrape()
    exporter.proc.send_signal(signal.SIGTERM)
    assert exporter.proc.wait(timeout=5) == 0, "no non-daemon thread holds the exit"


# ---------- a hung NVML ----------


def test_a_hung_nvml_call_costs_one_deadline_and_recovers(exporter_factory, scenario):
    scenario.gpus[0].used = 3 * GIB
    scenario.write()
    exporter = exporter_factory(scenario, "--nvml.timeout", "1", "--collection.min-interval", "0")
    assert one(exporter.scrape(), "gpu_residency_nvml_up") == 1
    scenario.gpus[1].hangs = {"memory"}
    scenario.write()
    started = time.monotonic()
    m = exporter.scrape()
    assert time.monotonic() - started < 3, "the scrape answers at the deadline"
    assert one(m, "gpu_residency_nvml_up") == 0 and values(m, "gpu_residency_memory_used_bytes") == []
    assert one(m, "gpu_residency_errors_total", source="nvml", reason="timeout") == 1
    started = time.monotonic()
    m = exporter.scrape()
    assert time.monotonic() - started < 0.5, "while the call is still stuck, scrapes do not queue behind it"
    assert one(m, "gpu_residency_errors_total", source="nvml", reason="hung") >= 1
    scenario.gpus[1].hangs = set()
    scenario.write()
    m = _wait_for(lambda: (m := exporter.scrape()) and one(m, "gpu_residency_nvml_up") == 1 and m)
    assert one(m, "gpu_residency_memory_used_bytes", gpu=0) == 3 * GIB


def test_the_gate_nvml_source_blocks_with_the_reason_when_nvml_hangs(fake_nvml_dir, scenario):
    scenario.gpus[0].delays_ms = {"memory": 50}
    scenario.gpus[1].hangs = {"memory"}
    scenario.write()
    code = (
        "import time; from gate import ResidualGate; from gate.nvml_source import NvmlSource;"
        "gate = ResidualGate(2, source=NvmlSource(timeout=1.0)); t = time.monotonic();"
        "d = gate.check([0]); print(round(time.monotonic() - t, 1), d.ok); print(d.explain())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env=dict(scenario.environ(fake_nvml_dir), PYTHONPATH=str(ROOT)), check=False)  # fmt: skip
    waited, ok = result.stdout.splitlines()[0].split()
    assert ok == "False" and float(waited) <= 1.5, result.stdout + result.stderr
    assert "no answer in 1s (a GPU or the driver hangs)" in result.stdout


def test_gate_nvml_source_falls_back_when_memory_v2_is_an_older_struct(fake_nvml_dir, scenario, monkeypatch):
    monkeypatch.setenv("FAKE_NVML_SCENARIO", str(scenario.path))
    monkeypatch.setenv("LD_LIBRARY_PATH", str(fake_nvml_dir))
    scenario.gpus[0].used = GIB
    scenario.gpus[0].errors = {"memory_v2": 25}  # NVML_ERROR_ARGUMENT_VERSION_MISMATCH
    scenario.write()
    import ctypes

    ctypes.CDLL(str(fake_nvml_dir / fakenvml.SONAME))
    samples = GateNvmlSource().read("n")
    assert samples[0].used_bytes == GIB + scenario.gpus[0].reserved, "v1: used includes the reserved part"


# ---------- exits: the first one is seen by increase() ----------


def test_a_new_exit_series_is_published_at_zero_first(exporter_factory, scenario, tmp_path):
    exporter = exporter_factory(scenario, "--registry.dir", str(tmp_path / "reg"),
                                "--exits.first-zero-seconds", "1.5")  # fmt: skip
    report_exit("first", -9, directory=tmp_path / "reg")
    assert one(exporter.scrape(), "gpu_residency_engine_exits_total", engine="first") == 0
    time.sleep(1.6)
    assert one(exporter.scrape(), "gpu_residency_engine_exits_total", engine="first") == 1


def test_the_exit_alert_fires_on_an_engines_first_exit(exporter_factory, prometheus_factory, scenario, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text((ROOT / "dashboards" / "alerts.yaml").read_text())
    exporter = exporter_factory(scenario, "--registry.dir", str(tmp_path / "reg"),
                                "--exits.first-zero-seconds", "3")  # fmt: skip
    prometheus = prometheus_factory([exporter.url.removeprefix("http://")], rule_files=[rules])
    prometheus.wait_for("gpu_residency_nvml_up")
    report_exit("killed", -9, directory=tmp_path / "reg")
    firing = prometheus.wait_for('ALERTS{alertname="GpuEngineKilled", engine="killed"}', timeout=40)
    assert firing[0]["metric"]["alertstate"] == "firing"


# ---------- blind is not empty ----------


def test_a_release_is_not_recorded_while_the_process_list_is_unreadable(exporter_factory, scenario, spawn_tree,
                                                                        tmp_path):  # fmt: skip
    registry = tmp_path / "reg"
    tree = spawn_tree()
    register_engine("e", root_pid=tree.pid, directory=registry, state="active")
    scenario.gpus[0].processes = [(tree.leaves[0], 20 * GIB)]
    scenario.gpus[0].used = 21 * GIB
    scenario.write()
    exporter = exporter_factory(scenario, "--registry.dir", str(registry), "--engines.state-interval", "0.1")
    exporter.scrape()
    scenario.gpus[0].errors = {"processes": NOT_SUPPORTED}
    scenario.write()
    set_engine_state("e", "asleep", registry)
    time.sleep(1.0)
    m = exporter.scrape()
    assert values(m, "gpu_residency_engine_release_seconds_count", engine="e") == [], "blind: nothing decided"
    scenario.gpus[0].errors = {}
    scenario.gpus[0].processes = [(tree.leaves[0], GIB)]
    scenario.write()
    m = _wait_for(lambda: (m := exporter.scrape()) and values(m, "gpu_residency_engine_release_seconds_count") and m)
    assert one(m, "gpu_residency_engine_release_seconds_count", engine="e") == 1


# ---------- gate ----------


def test_cli_wait_exits_1_when_clear_samples_were_never_met(fake_nvml_dir, scenario):
    scenario.gpus[0].used = GIB
    scenario.write()
    result = subprocess.run(
        [sys.executable, "-m", "gate", "wait", "--gpus", "0", "--source", "nvml", "--timeout", "0.6", "--poll", "0.2",
         "--clear-samples", "100"],
        capture_output=True, text=True, timeout=60, env=dict(scenario.environ(fake_nvml_dir), PYTHONPATH=str(ROOT)),
        check=False,
    )  # fmt: skip
    assert result.returncode == 1 and "timed out" in result.stderr, result.stdout + result.stderr


def test_probe_never_uses_a_sample_the_gate_judged_stale(monkeypatch):
    class Old:
        name = "old"

        def read(self, node):
            return [GpuSample(0, "GPU-0", "0:18:00.0", GIB, age_seconds=600)]

    import gate.compat

    monkeypatch.setattr(gate.compat.ResidualGate, "from_env", classmethod(lambda cls, **kw: cls(source=Old())))
    assert probe_max_used_gpu_mem_gb([0]) is None


def test_a_mig_id_is_refused_with_the_reason_by_a_source_that_does_not_read_mig():
    class Any:
        name = "any"

        def read(self, node):
            return []

    with pytest.raises(GateConfigError, match="MIG instances are not supported by the any source"):
        ResidualGate(2, source=Any()).check(["MIG-4f1c2a3b-0000-0000-0000-000000000000"])


# ---------- URLs, readings, per-engine state ----------


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:30000/flush_cache?x=", "http://127.0.0.1:30000/?a=b", "http://127.0.0.1:30000#f",
     "http://127.0.0.1:30000/v1"],
)  # fmt: skip
def test_engine_urls_are_base_urls_only(url):
    assert "scheme://host:port only" in UrlPolicy.default().check(url)
    assert UrlPolicy.default().check("http://127.0.0.1:30000/") is None


def test_negative_unattributed_is_absent_and_counted_and_v1_hides_nothing(local_exporter, scenario):
    scenario.gpus[0].processes = [(os.getpid(), 5 * GIB)]
    scenario.gpus[0].used = 4 * GIB  # the process list and used straddled a free
    scenario.gpus[1].processes = [(os.getpid(), GIB)]
    scenario.gpus[1].used = 2 * GIB
    scenario.gpus[1].errors = {"memory_v2": NOT_SUPPORTED}  # an older driver: used includes reserved
    scenario.write()
    m = local_exporter.scrape()
    assert values(m, "gpu_residency_unattributed_memory_bytes", gpu=0) == []
    assert one(m, "gpu_residency_errors_total", source="attribution", reason="inconsistent") == 1
    assert values(m, "gpu_residency_unattributed_memory_bytes", gpu=1) == []
    assert one(m, "gpu_residency_memory_used_bytes", gpu=1) == 2 * GIB + scenario.gpus[1].reserved


def test_histograms_of_an_engine_that_left_are_dropped():
    from exporter.engines.catalog import Engine
    from exporter.sleep_wake.transitions import TransitionTracker
    from exporter.snapshot.attribution import Snapshot
    from exporter.sources.nvml import NvmlReading

    tracker = TransitionTracker("n", GIB, 60, 60)
    engine = Engine("gone", "sglang", None, "registry", 1, None, True, state="asleep", state_since=time.time())
    tracker.observe(Snapshot(NvmlReading(True, ()), (engine,), (), (), ()))
    shown = {f.name: f.samples for f in tracker.families(Snapshot(NvmlReading(True, ()), (engine,), (), (), ()))}
    assert shown["gpu_residency_engine_release_seconds"], "released: held nothing on any GPU"
    shown = {f.name: f.samples for f in tracker.families(Snapshot(NvmlReading(True, ()), (), (), (), ()))}
    assert shown["gpu_residency_engine_release_seconds"] == [], "the engine left: its histogram with it"


def test_rotated_events_lose_no_count_across_exporter_restarts(local_exporter, tmp_path, monkeypatch, fake_nvml_dir):
    from exporter.exits import report as exits

    registry = local_exporter.registry_dir
    monkeypatch.setattr(exits, "ROTATE_BYTES", 4096)  # rotate every ~20 events
    for _ in range(6):
        for _ in range(15):
            report_exit("churn", -9, directory=registry)
        local_exporter.scrape()
    assert (registry / "events.jsonl.1").exists(), "rotated"
    assert (registry / "events.jsonl").stat().st_size < 4096 + exits.MAX_EVENT_BYTES, "bounded"
    for _ in range(15):  # written while no exporter runs (at most one rotation)
        report_exit("churn", -9, directory=registry)
    restarted = build_local(registry, tmp_path / "state", fake_nvml_dir)  # the same state directory: a restart
    assert one(restarted.scrape(), "gpu_residency_engine_exits_total", engine="churn") == 105


# ---------- web config ----------


@pytest.mark.parametrize(
    "body, message",
    [
        ("tls_server_config:\n  cert_file: a\n", "missing key_file"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequestClientCert\n",
         "without verifying"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: Sometimes\n", "Invalid ClientAuth"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_ca_file: c\n", "without a Client Auth Policy"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS14\n", "unknown TLS version: TLS14"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [TLS_FAKE]\n", "unknown cipher"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  curve_preferences: [X25519, CurveP256]\n",
         "sets one curve"),
        ("tls_server_config:\n  cert: '-----BEGIN'\n", "inline certificates are not supported"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_allowed_sans: [x]\n",
         "needs client_auth_type: RequireAndVerifyClientCert"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  surprise: 1\n", "unknown keys"),
        ("http_server_config:\n  headers:\n    Authorization: x\n", "is not one of"),
        ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n", "invalid value"),
        ("http_server_config:\n  http3: true\n", "unknown keys"),
    ],
)  # fmt: skip
def test_every_exporter_toolkit_key_is_implemented_or_refused(tmp_path, body, message):
    from exporter.web.config import WebConfigError, load_web_config

    config = tmp_path / "web.yml"
    config.write_text(body)
    with pytest.raises(WebConfigError, match=message):
        load_web_config(str(config))


@pytest.fixture
def pki(tmp_path):
    from conftest import require_tool

    openssl = require_tool("openssl")

    def run(*args):
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=tmp_path)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca", "-keyout", "ca.key",
        "-out", "ca.crt")  # fmt: skip
    for name, san in (("server", "IP:127.0.0.1"), ("good", "DNS:prometheus.monitoring"), ("bad", "DNS:intruder")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out",
            f"{name}.csr")  # fmt: skip
        (tmp_path / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days",
            "1", "-extfile", f"{name}.ext", "-out", f"{name}.crt")  # fmt: skip
    return tmp_path


def test_mutual_tls_with_allowed_sans_versions_ciphers_and_headers(exporter_factory, scenario, pki):
    config = pki / "web.yml"
    config.write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_ca_file: ca.crt\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_allowed_sans: [prometheus.monitoring]\n"
        "  min_version: TLS12\n  max_version: TLS12\n  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384]\n"
        "  curve_preferences: [CurveP384]\n"
        "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
    )  # relative paths: from the config file's directory, as exporter-toolkit resolves them
    exporter = exporter_factory(scenario, "--web.config.file", str(config))
    ca = str(pki / "ca.crt")
    good = requests.get(exporter.url + "/metrics", verify=ca, cert=(pki / "good.crt", pki / "good.key"), timeout=10)
    assert good.status_code == 200 and good.headers["X-Content-Type-Options"] == "nosniff"
    assert requests.get(exporter.url + "/metrics", verify=ca, cert=(pki / "bad.crt", pki / "bad.key"),
                        timeout=10).status_code == 403  # fmt: skip
    assert "its certificate names none of client_allowed_sans" in exporter.log(), "refused, and said once"
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(exporter.url + "/metrics", verify=ca, timeout=10)  # no client certificate
    import socket
    import ssl

    client = ssl.create_default_context(cafile=ca)
    client.load_cert_chain(pki / "good.crt", pki / "good.key")
    host, port = exporter.url.removeprefix("https://").rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        client.wrap_socket(raw, server_hostname=host) as tls,
    ):
        assert tls.version() == "TLSv1.2" and tls.cipher()[0] == "ECDHE-RSA-AES256-GCM-SHA384"


def test_an_unknown_user_costs_what_a_wrong_password_costs(exporter_factory, scenario, tmp_path):
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=10)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    exporter = exporter_factory(scenario, "--web.config.file", str(config))

    def cost(user: str) -> float:
        header = {"Authorization": "Basic " + base64.b64encode(f"{user}:wrong".encode()).decode()}
        started = time.perf_counter()
        assert requests.get(exporter.url + "/metrics", headers=header, timeout=30).status_code == 401
        return time.perf_counter() - started

    known = min(cost("prometheus") for _ in range(3))
    unknown = min(cost("nobody") for _ in range(3))
    assert 0.5 < unknown / known < 2.0, (known, unknown)


def test_a_failed_tls_handshake_is_one_debug_line_not_a_traceback(exporter_factory, scenario, tls_files, tmp_path):
    cert, key = tls_files
    config = tmp_path / "web.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
    exporter = exporter_factory(scenario, "--web.config.file", str(config))
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(exporter.url.replace("https", "http") + "/metrics", timeout=5)  # plain HTTP to a TLS port
    assert requests.get(exporter.url + "/healthz", verify=str(cert), timeout=5).ok
    assert "Traceback" not in exporter.log()


def test_the_nodes_own_addresses_are_allowed_engine_hosts():
    from exporter.pollers.url_policy import node_addresses

    own = [n.network_address for n in node_addresses() if not n.network_address.is_loopback]
    if not own:
        pytest.skip("no non-loopback interface address on this machine")
    address = own[0]
    host = f"[{address}]" if address.version == 6 else str(address)
    assert UrlPolicy.default().check(f"http://{host}:30000") is None
    assert "outside the allowed networks" in UrlPolicy.default().check("http://192.0.2.1:30000")


def test_the_deadline_runner_does_quiet_work_only_while_no_call_comes():
    """Issue 26: the NVML thread keeps the GPU history itself between scrapes. Its quiet work runs once
    no call came for `after` seconds, then as often as it asks; None pauses it until a call came and went
    quiet again; its own calls run at once; a call that comes while it runs waits for it, and a quiet
    work stuck past a caller's deadline makes later calls fail at once, as a stuck call does."""
    from gpu_residency_common.deadline import DeadlineExceeded, DeadlineRunner

    runner, runs, stuck = DeadlineRunner("t"), [], threading.Event()

    def work() -> float | None:
        runs.append(runner.call(lambda: time.monotonic(), 1.0))  # on its own thread: at once
        if len(runs) == 3:
            return None
        stuck.wait(30) if len(runs) == 5 else None
        return 0.05

    runner.when_quiet(0.3, work)
    _wait_for(lambda: len(runs) == 3)
    time.sleep(0.3)
    assert len(runs) == 3, "paused until a call comes"
    assert runner.call(lambda: "answered", 1.0) == "answered"
    started = time.monotonic()
    _wait_for(lambda: len(runs) == 5)
    assert runs[3] - started >= 0.25, "quiet again only `after` the call"
    with pytest.raises(DeadlineExceeded) as first:
        runner.call(lambda: "late", 0.2)
    assert not first.value.busy, "it waited its deadline for the quiet work"
    with pytest.raises(DeadlineExceeded) as second:
        runner.call(lambda: "late", 0.2)
    assert second.value.busy, "stuck past a deadline: at once"
    stuck.set()
    _wait_for(lambda: _answers(runner))
    runner.when_quiet(0.0, None)


def _answers(runner) -> bool:
    try:
        return runner.call(lambda: True, 0.5)
    except Exception:
        return False
