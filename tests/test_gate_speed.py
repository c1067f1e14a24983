"""Issue 18: the gate's adaptive wait, the exporter's JSON API and long poll, and the gate's
exporter source. Behaviour and bounds only: reaction times are measured by benchmarks/reaction.py,
never asserted here (the few time bounds below are generous sanity limits on correctness)."""

from __future__ import annotations

import ctypes
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time

import bcrypt
import pytest
import requests
from conftest import ROOT, visible_devices

import fakenvml
from fakenvml import GIB, GPU_IS_LOST, NOT_SUPPORTED
from fakenvml.prometheus import free_port
from gate import Decision, GateConfigError, GateTimeout, GpuSample, GpuVerdict, Holder, ResidualGate
from gate.exporter_source import ExporterSource
from gate.nvml_source import NvmlSource
from gate.pace import Pace
from gate.settings import LONG_POLL_S
from gate.sources import build_source

# ---------- the adaptive pace ----------


def _decision(used_gb: float | None, failed: bool = False) -> Decision:
    if failed:
        return Decision(False, (GpuVerdict("0", None, False, "source failed"),), 2 * GIB, "t", ("down",))
    sample = GpuSample(0, "GPU-0", "", None if used_gb is None else int(used_gb * GIB))
    return Decision(False, (GpuVerdict("0", sample, False, "over threshold"),), 2 * GIB, "t")


def test_pace_fast_early_near_and_falling_backs_off_when_far():
    pace = Pace(fast=0.005, slow=0.5, eager_s=5.0, near_bytes=4 * GIB)
    assert pace.next(_decision(60), elapsed=0.1) == 0.005, "early in the wait: fast, however far"
    far = [pace.next(_decision(60), elapsed=6 + i) for i in range(10)]
    assert far[:4] == [0.01, 0.02, 0.04, 0.08] and far[-1] == 0.5, "far and steady: doubling up to poll_s"
    assert pace.next(_decision(3.5), elapsed=20) == 0.005, "within near_gb of the threshold: fast"
    pace.next(_decision(60), elapsed=21)
    assert pace.next(_decision(59), elapsed=22) == 0.005, "memory falling (a release under way): fast"
    assert pace.next(_decision(59), elapsed=23) == 0.01, "steady again: backing off"


def test_pace_backs_off_while_the_source_fails_even_early():
    pace = Pace(fast=0.005, slow=0.5, eager_s=5.0, near_bytes=4 * GIB)
    delays = [pace.next(_decision(None, failed=True), elapsed=0.1 * i) for i in range(9)]
    assert delays == [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.5, 0.5], "a failing source is not hammered"
    assert pace.next(_decision(None), elapsed=1) == 0.5, "a GPU without a figure is not 'near'"


def test_source_floor_and_poll_cap():
    class Slow:
        name = "slow"
        poll_floor_s = 0.5

        def read(self, node):
            return []

    assert ResidualGate(2, source=Slow()).fast_poll_s == 0.5
    assert ResidualGate(2, source=Slow(), poll_s=0.2).fast_poll_s == 0.2, "never slower than poll_s"
    for bad in ({"fast_poll_s": 0}, {"eager_s": -1}, {"near_gb": -1}):
        with pytest.raises(GateConfigError, match="must be"):
            ResidualGate(2, source=Slow(), **bad)


class Draining:
    """read_used() for the repeated looks, read() (with holders) for full ones; counts both."""

    name = "draining"

    def __init__(self, used_gb: float):
        self.used_gb, self.full, self.fast = used_gb, 0, 0

    def _sample(self, holders=()):
        return [GpuSample(0, "GPU-0", "00000000:18:00.0", int(self.used_gb * GIB), None, holders)]

    def read(self, node):
        self.full += 1
        return self._sample((Holder("engine", "rollout-0", int(self.used_gb * GIB)),))

    def read_used(self, node):
        self.fast += 1
        return self._sample()


def test_wait_repeats_cheap_looks_and_explains_a_timeout_with_holders():
    source = Draining(9)
    gate = ResidualGate(2, source=source, poll_s=0.05)
    with pytest.raises(GateTimeout) as caught:
        gate.wait([0], timeout=0.3)
    assert source.fast >= 2 and source.full == 1, "cheap looks while waiting, one full look at the timeout"
    assert "engine rollout-0: 9.0 GiB" in str(caught.value)
    assert caught.value.waited >= 0.3, "the last look is at the deadline, not one poll before it"


def test_wait_records_its_decision_on_changes_not_on_every_look(tmp_path):
    source = Draining(9)
    gate = ResidualGate(2, source=source, record_dir=tmp_path)
    threading.Timer(0.3, lambda: setattr(source, "used_gb", 1)).start()
    writes = []
    original = gate._record
    gate._record = lambda engine, decision: (writes.append(decision.ok), original(engine, decision))
    assert gate.wait([0], timeout=10, wake="rollout-1").ok
    assert writes == [False, True], f"first look and the change, not each of {source.fast} looks"
    assert '"clear": true' in (tmp_path / "gate" / "rollout-1.json").read_text()


def test_a_clear_streak_is_confirmed_at_poll_s_and_on_poll_sees_every_look():
    values = iter([5.0, 0.5, 5.0, 0.5, 0.5, 0.5])
    source = Draining(0)
    source.read_used = lambda node: [GpuSample(0, "GPU-0", "", int(next(values) * GIB))]
    seen = []
    gate = ResidualGate(2, source=source, clear_samples=3, poll_s=0.1)
    gate.wait([0], timeout=5, on_poll=lambda d, elapsed: seen.append((d.ok, elapsed)))
    assert [ok for ok, _ in seen] == [False, True, False, True, True, True]
    assert seen[-1][1] - seen[-3][1] >= 2 * 0.1, "confirming looks come poll_s apart: the hold time clear_samples buys"


class LongPolling:
    """A source that waits at the source (as the exporter does); records each call's budget."""

    name = "long"

    def __init__(self, answers):
        self.answers, self.budgets = list(answers), []

    def read(self, node):
        raise AssertionError("a long-polling source is asked to wait, not read")

    def wait_until_under(self, node, names, threshold_bytes, timeout):
        self.budgets.append(timeout)
        return [GpuSample(0, "GPU-0", "", int(self.answers.pop(0) * GIB))]


def test_long_poll_budgets_and_the_clear_streak():
    source = LongPolling([9, 1, 9, 1, 1])
    gate = ResidualGate(2, source=source, clear_samples=2)
    assert gate.wait([0], timeout=60).ok
    budgets = source.budgets
    assert budgets[0] == LONG_POLL_S, "one long poll is a few seconds at most (a hung exporter shows)"
    assert budgets[2] == budgets[4] == 0.0, "confirming a clear streak: a look that answers at once"
    assert 0 < budgets[1] <= LONG_POLL_S and 0 < budgets[3] <= LONG_POLL_S


# ---------- NVML: the memory-only read ----------


@pytest.fixture
def nvml_env(fake_nvml_dir, scenario, monkeypatch):
    monkeypatch.setenv("FAKE_NVML_SCENARIO", str(scenario.path))
    ctypes.CDLL(str(fake_nvml_dir / fakenvml.SONAME))
    scenario.gpus[0].used, scenario.gpus[1].used = 10 * GIB, GIB // 2
    scenario.gpus[0].processes = [(os.getpid(), 9 * GIB)]
    scenario.write()
    return scenario


def test_nvml_read_used_agrees_with_read_without_holders(nvml_env):
    source = NvmlSource()
    full, fast = source.read("n"), source.read_used("n")
    assert [(s.index, s.uuid, s.pci_bus_id, s.used_bytes) for s in full] == [
        (s.index, s.uuid, s.pci_bus_id, s.used_bytes) for s in fast
    ]
    assert full[0].holders and not fast[0].holders
    nvml_env.gpus[1].errors = {"memory": GPU_IS_LOST}
    nvml_env.gpus[0].errors = {"memory": NOT_SUPPORTED}
    nvml_env.write()
    assert [(s.index, s.used_bytes) for s in source.read_used("n")] == [(0, None)], "lost: no sample; [N/A]: None"
    nvml_env.gpus[0].errors, nvml_env.gpus[1].errors = {}, {}
    nvml_env.write()
    assert [s.index for s in source.read_used("n")] == [0, 1], "a GPU back is named afresh"


def test_nvml_wait_clears_and_a_hang_blocks_with_the_reason(nvml_env):
    gate = ResidualGate(2, source=NvmlSource(timeout=0.5))
    threading.Timer(0.3, lambda: (setattr(nvml_env.gpus[0], "used", GIB), nvml_env.write())).start()
    assert gate.wait([0, 1], timeout=10).ok
    nvml_env.gpus[1].hangs = {"memory"}
    nvml_env.write()
    try:
        with pytest.raises(GateTimeout, match="a GPU or the driver hangs"):
            gate.wait([0, 1], timeout=1.5)
    finally:
        nvml_env.gpus[1].hangs = set()
        nvml_env.write()


# ---------- the exporter's JSON API ----------


@pytest.fixture
def node(scenario, spawn_tree, tmp_path, monkeypatch):
    """GPU 0 held by engine rollout-0 (9 GiB of 10), GPU 1 nearly empty; the gate sees both."""
    from exporter.registry import register_engine

    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", visible_devices(scenario))

    tree = spawn_tree()
    register_engine("rollout-0", root_pid=tree.pid, directory=tmp_path / "reg")
    scenario.gpus[0].processes = [(tree.leaves[0], 9 * GIB)]
    scenario.gpus[0].used = 10 * GIB
    scenario.gpus[1].used = GIB // 2
    scenario.write()
    return scenario, tree


@pytest.fixture
def api_exporter(exporter_factory, node, tmp_path):
    def start(*extra: str, env=None):
        return exporter_factory(
            node[0], "--registry.dir", str(tmp_path / "reg"), "--no-engines.discover", *extra, env=env
        )

    return start


def wait_url(exporter, gpus="0", threshold=2 * GIB, timeout=5.0) -> str:
    return f"{exporter.url}/api/v1/wait?gpus={gpus}&threshold_bytes={threshold}&timeout={timeout}"


def test_api_gpus_is_the_scrapes_collection_with_holders(api_exporter, node):
    scenario, tree = node
    exporter = api_exporter()
    body = requests.get(exporter.url + "/api/v1/gpus", timeout=10).json()
    assert body["nvml_up"] is True and body["node"] == "test-node" and body["age_seconds"] < 5
    gpu0, gpu1 = body["gpus"]
    assert (gpu0["index"], gpu0["uuid"], gpu0["pci_bus_id"]) == (0, scenario.gpus[0].uuid, scenario.gpus[0].pci_bus_id)
    assert gpu0["used_bytes"] == 10 * GIB and gpu0["total_bytes"] == 80 * GIB
    assert gpu0["engines"] == [{"engine": "rollout-0", "used_bytes": 9 * GIB}]
    (holder,) = gpu0["holders"]
    assert holder["pid"] == tree.leaves[0] and holder["engine"] == "rollout-0" and holder["holder"] == "rollout-0"
    assert holder["comm"].startswith("sglang::scheduler") and holder["used_bytes"] == 9 * GIB
    assert gpu0["unattributed_bytes"] == GIB and gpu1["holders"] == []
    scenario.gpus[0].used = 3 * GIB
    scenario.write()
    deadline = time.monotonic() + 10  # the next collection: --collection.min-interval (0.25 s) after the last
    while (again := requests.get(exporter.url + "/api/v1/gpus", timeout=10).json())["gpus"][0]["used_bytes"] != 3 * GIB:
        assert time.monotonic() < deadline, "the new reading never came"
    assert again["age_seconds"] < 5 and again["taken_at"] > body["taken_at"]


def test_api_wait_answers_when_clear_or_at_its_timeout(api_exporter, node):
    scenario, _ = node
    exporter = api_exporter("--api.max-wait", "2")
    started = time.monotonic()
    body = requests.get(wait_url(exporter, "0,1", timeout=0.5), timeout=10).json()
    waited = time.monotonic() - started
    assert body["clear"] is False and body["nvml_up"] is True and waited >= 0.5
    assert body["timeout"] == 0.5 and body["threshold_bytes"] == 2 * GIB
    assert [g["used_bytes"] for g in body["gpus"]] == [10 * GIB, GIB // 2]
    assert body["gpus"][0]["engines"] == [{"engine": "rollout-0", "used_bytes": 9 * GIB}], "not clear: who holds it"
    capped = requests.get(wait_url(exporter, "0", timeout=600), timeout=30).json()
    assert capped["clear"] is False and capped["timeout"] == 2.0, "capped by --api.max-wait"
    threading.Timer(0.5, lambda: (setattr(scenario.gpus[0], "used", GIB), scenario.write())).start()
    started = time.monotonic()
    body = requests.get(wait_url(exporter, f"{scenario.gpus[0].uuid},1", timeout=30), timeout=60).json()
    assert body["clear"] is True and time.monotonic() - started < 20, "answered when clear, not at the timeout"
    assert [g["used_bytes"] for g in body["gpus"]] == [GIB, GIB // 2]
    unknown = requests.get(wait_url(exporter, "0,7", timeout=0), timeout=10).json()
    assert unknown["clear"] is False and "7" in unknown["reason"], "a GPU that matches nothing is never clear"


@pytest.mark.parametrize(
    "query, message",
    [
        ("threshold_bytes=5", "gpus is required"),
        ("gpus=0", "threshold_bytes is required"),
        ("gpus=0&threshold_bytes=-1", "threshold_bytes"),
        ("gpus=0&threshold_bytes=1.5", "threshold_bytes"),
        ("gpus=0&threshold_bytes=5&timeout=-1", "timeout"),
        ("gpus=0&threshold_bytes=5&timeout=nan", "timeout"),
        ("gpus=0,,1&threshold_bytes=5", "gpus"),
        ("gpus=" + ",".join(["0"] * 65) + "&threshold_bytes=5", "gpus"),
        ("gpus=" + "x" * 200 + "&threshold_bytes=5", "longer than"),
        ("gpus=0&gpus=1&threshold_bytes=5", "more than once"),
    ],
)
def test_api_wait_refuses_bad_queries(local_api, query, message):
    api, _ = local_api
    status, _, body = api.wait(_request(query))
    assert status == 400 and message in json.loads(body)["error"]
    assert api.hub.waiters == 0 and api.hub.reads == 0, "refused before taking a place"


def _raw_long_poll(exporter, timeout: float = 30) -> socket.socket:
    host, port = exporter.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    path = f"/api/v1/wait?gpus=0&threshold_bytes={2 * GIB}&timeout={timeout}"
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return sock


def _answered(sock: socket.socket) -> bool:
    """The exporter answered (or closed) this long poll: it holds no place any more."""
    readable, _, _ = select.select([sock], [], [], 0)
    if readable:
        sock.close()
    return bool(readable)


def test_api_waiter_cap_and_a_disconnect_frees_its_place(api_exporter):
    exporter = api_exporter("--api.max-waiters", "2")
    polls = [_raw_long_poll(exporter), _raw_long_poll(exporter)]
    deadline = time.monotonic() + 30
    while True:  # both are being held once a third is refused
        refused = requests.get(wait_url(exporter, timeout=0), timeout=10)
        if refused.status_code == 429:
            break
        assert time.monotonic() < deadline, f"a third long poll was never refused: {refused.status_code}"
        # A long poll answered early (its NVML read outran --nvml.timeout on a loaded machine) holds
        # no place: ask again in its stead.
        polls = [_raw_long_poll(exporter) if _answered(poll) else poll for poll in polls]
        time.sleep(0.05)
    first, second = polls
    assert refused.headers["Retry-After"] == "1"
    assert "too many waiters" in refused.json()["error"]
    assert requests.get(exporter.url + "/api/v1/gpus", timeout=10).status_code == 200, "reads are not waiters"
    first.close()
    deadline = time.monotonic() + 20
    while (answer := requests.get(wait_url(exporter, timeout=0), timeout=10)).status_code == 429:
        assert time.monotonic() < deadline, "the closed connection's place was never freed"
        time.sleep(0.05)
    assert answer.status_code == 200 and answer.json()["clear"] is False
    second.settimeout(0.2)
    with pytest.raises(TimeoutError):
        second.recv(1)  # the other waiter is still waiting
    second.close()


def test_api_refuses_every_long_poll_with_no_places_and_the_gate_still_reads(api_exporter, node):
    scenario, _ = node
    exporter = api_exporter("--api.max-waiters", "0")
    assert requests.get(wait_url(exporter, timeout=0), timeout=10).status_code == 429
    gate = ResidualGate(2, source=ExporterSource(exporter.url), poll_s=0.1)
    threading.Timer(0.3, lambda: (setattr(scenario.gpus[0], "used", GIB), scenario.write())).start()
    assert gate.wait([0], timeout=20).ok, "429: the source reads /api/v1/gpus instead, at the gate's pace"


def test_api_has_the_same_tls_and_basic_auth_as_metrics(api_exporter, tls_files, tmp_path, monkeypatch):
    cert, key = tls_files
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(
        f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\nbasic_auth_users:\n  gate: '{hashed}'\n"
    )
    exporter = api_exporter("--web.config.file", str(config))
    assert exporter.url.startswith("https://")
    for path in ("/api/v1/gpus", "/api/v1/wait?gpus=1&threshold_bytes=1&timeout=0"):
        assert requests.get(exporter.url + path, verify=str(cert), timeout=10).status_code == 401
        wrong = requests.get(exporter.url + path, verify=str(cert), auth=("gate", "nope"), timeout=10)
        assert wrong.status_code == 401
        assert requests.get(exporter.url + path, verify=str(cert), auth=("gate", "s3cret"), timeout=10).ok
    no_auth = ResidualGate(2, source=ExporterSource(exporter.url, ca_file=str(cert)))
    decision = no_auth.check([1])
    assert not decision.ok and "HTTP 401" in decision.explain() and "credentials" in decision.explain()
    untrusted = ResidualGate(2, source=ExporterSource(exporter.url, username="gate", password="s3cret"))
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.check([1]).explain(), "https is verified"
    password_file = tmp_path / "password"
    password_file.write_text("s3cret\n")
    monkeypatch.setenv("GPU_RESIDENCY_EXPORTER_CA_FILE", str(cert))
    monkeypatch.setenv("GPU_RESIDENCY_EXPORTER_USER", "gate")
    monkeypatch.setenv("GPU_RESIDENCY_EXPORTER_PASSWORD_FILE", str(password_file))
    monkeypatch.setenv("GPU_RESIDENCY_EXPORTER_URL", exporter.url)
    gate = ResidualGate.from_env(threshold_gb=2)
    assert gate.source.name == "exporter" and gate.check([1]).ok
    assert gate.wait([1], timeout=10).ok, "the long poll over TLS with credentials"


def test_api_answers_waiters_when_nvml_hangs(api_exporter, node):
    scenario, _ = node
    exporter = api_exporter("--nvml.timeout", "1")
    assert requests.get(exporter.url + "/api/v1/gpus", timeout=10).json()["nvml_up"] is True
    scenario.gpus[1].hangs = {"memory"}
    scenario.write()
    try:
        started = time.monotonic()
        body = requests.get(wait_url(exporter, "1", timeout=30), timeout=60).json()
        assert body["nvml_up"] is False and body["clear"] is False and "hang" in body["reason"]
        assert time.monotonic() - started < 20, "answered with the reason, not at its 30 s timeout"
        gate = ResidualGate(2, source=ExporterSource(exporter.url))
        with pytest.raises(GateTimeout, match=r"the exporter's NVML is down: .*hang"):
            gate.wait([1], timeout=2)
    finally:
        scenario.gpus[1].hangs = set()
        scenario.write()
    deadline = time.monotonic() + 20
    while not ResidualGate(2, source=ExporterSource(exporter.url)).check([1]).ok:
        assert time.monotonic() < deadline, "never recovered once NVML answered again"
        time.sleep(0.1)


def test_api_polls_nvml_only_while_someone_waits(local_api):
    api, _ = local_api
    assert api.hub.reads == 0, "nobody waited: NVML untouched by the API"
    response = api.wait(_request("gpus=0&threshold_bytes=1&timeout=0.2"))
    assert response[0] == 200
    deadline = time.monotonic() + 10
    while api.hub._thread is not None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    reads = api.hub.reads
    assert reads > 0
    time.sleep(0.1)
    assert api.hub.reads == reads, "no waiter: no more reads"


def _request(query: str, connection=None):
    from urllib.parse import parse_qs

    from exporter.web.server import Request

    return Request("/api/v1/wait", parse_qs(query), {}, connection)


@pytest.fixture
def local_api(tmp_path, fake_nvml_dir, scenario, monkeypatch):
    """The CLI's assembly in-process, with the API on its NvmlSource."""
    from exporter.cli import build_parser
    from exporter.errors import ErrorCounter
    from exporter.runtime import build_exporter
    from exporter.web.gpus_api import GpuApi

    monkeypatch.setenv("FAKE_NVML_SCENARIO", str(scenario.path))
    scenario.gpus[0].used = 10 * GIB  # never under the tests' thresholds
    scenario.write()
    args = build_parser().parse_args(
        ["--node", "n", "--registry.dir", str(tmp_path / "reg"), "--no-engines.discover", "--state.dir", "",
         "--nvml.library", str(fake_nvml_dir / fakenvml.SONAME)]
    )  # fmt: skip
    errors = ErrorCounter()
    exporter = build_exporter(args, errors)
    return GpuApi(
        "n", exporter.collector.shared, exporter.nvml, errors, max_waiters=1, max_wait=5, interval=0.01
    ), scenario


def test_api_disconnect_ends_the_wait(local_api):
    api, _ = local_api
    client, server = socket.socketpair()
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=api.wait(_request("gpus=0&threshold_bytes=1", server))))
    thread.start()
    deadline = time.monotonic() + 10
    while api.hub.waiters == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert api.wait(_request("gpus=0&threshold_bytes=1&timeout=0"))[0] == 429, "its one place is taken"
    client.close()
    thread.join(timeout=10)
    assert not thread.is_alive() and result["r"][0] == 499 and api.hub.waiters == 0
    server.close()


# ---------- the gate's exporter source ----------


def test_exporter_source_explains_with_holders(api_exporter, node):
    scenario, tree = node
    exporter = api_exporter()
    gate = ResidualGate(2, source="exporter", exporter_url=exporter.url + "/metrics")  # a /metrics URL works too
    decision = gate.check([0, scenario.gpus[1].uuid], waiting_for="rollout-0")
    text = decision.explain()
    assert not decision.ok and "blocked [source=exporter]" in text
    assert "top holders: engine rollout-0: 9.0 GiB, unattributed: 1.0 GiB" in text
    assert f"rollout-0 still holds 9.0 GiB on GPU 0 (pid {tree.leaves[0]} sglang::scheduler" in text
    with pytest.raises(GateTimeout, match=r"engine rollout-0: 9\.0 GiB"):
        gate.wait([0], timeout=0.5)
    threading.Timer(0.3, lambda: (setattr(scenario.gpus[0], "used", GIB), scenario.write())).start()
    assert gate.wait([0, 1], timeout=30).ok


def test_dead_exporter_blocks_with_the_reason_and_fail_open_passes():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    gate = ResidualGate(2, source=ExporterSource(url, timeout=2))
    decision = gate.check([0])
    assert not decision.ok and "exporter source: cannot reach" in decision.explain()
    assert "refused" in decision.explain().lower()
    started = time.monotonic()
    with pytest.raises(GateTimeout, match="cannot reach"):
        gate.wait([0], timeout=1)
    assert time.monotonic() - started < 10
    opened = ResidualGate(2, source=ExporterSource(url), fail_open=True).check([0])
    assert opened.ok and opened.fail_open


def test_hung_exporter_blocks_with_the_reason_within_its_timeout():
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does) and never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        gate = ResidualGate(2, source=ExporterSource(url, timeout=0.5))
        started = time.monotonic()
        decision = gate.check([0])
        assert not decision.ok and "no answer from" in decision.explain() and "in 0.5s" in decision.explain()
        assert time.monotonic() - started < 5
        started = time.monotonic()
        with pytest.raises(GateTimeout, match="no answer from"):
            gate.wait([0], timeout=1)
        assert time.monotonic() - started < 1 + 0.5 + 5, "the wait's timeout plus the source's, at most"
    finally:
        listener.close()


@pytest.mark.parametrize(
    "url, options, message",
    [
        ("ftp://x", {}, "not an http(s) base URL"),
        ("http://x:9852/?a=1", {}, "not an http(s) base URL"),
        ("http://x:9852", {"ca_file": "/ca.pem"}, "not https"),
        ("https://x:9852", {"ca_file": "/does/not/exist"}, "cannot use CA file"),
        ("http://x:9852", {"username": "u"}, "without a password"),
        ("http://x:9852", {"password": "p"}, "without a user"),
    ],
)
def test_exporter_source_settings_fail_at_construction(url, options, message, monkeypatch):
    for name in ("USER", "PASSWORD", "PASSWORD_FILE", "CA_FILE"):
        monkeypatch.delenv(f"GPU_RESIDENCY_EXPORTER_{name}", raising=False)
    with pytest.raises(GateConfigError, match=re.escape(message)):
        ResidualGate(2, source="exporter", exporter_url=url, exporter_options=options)


def test_auto_prefers_the_exporter_then_prometheus(monkeypatch):
    assert build_source("auto", "http://prom:9090", exporter_url="http://node:9852").name == "exporter"
    assert build_source("auto", "http://prom:9090").name == "prometheus"
    with pytest.raises(GateConfigError, match="needs a URL"):
        build_source("exporter", None)
    monkeypatch.setenv("GPU_RESIDENCY_PROMETHEUS_URL", "http://prom:9090")
    monkeypatch.setenv("GPU_RESIDENCY_EXPORTER_URL", "http://node:9852")
    assert ResidualGate.from_env().source.name == "exporter"
    monkeypatch.setenv("GPU_RESIDENCY_GATE_SOURCE", "prometheus")
    assert ResidualGate.from_env().source.name == "prometheus", "an explicit source wins"


def test_cli_with_the_exporter_source(api_exporter, tmp_path):
    exporter = api_exporter()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "gate"]

    def run(*args):
        return subprocess.run([*base, *args], capture_output=True, text=True, env=env, timeout=60, check=False)

    assert run("check", "--gpus", "1", "--exporter-url", exporter.url).returncode == 0
    blocked = run("wait", "--gpus", "0", "--source", "exporter", "--exporter-url", exporter.url, "--timeout", "0.5")
    assert blocked.returncode == 1 and "engine rollout-0: 9.0 GiB" in blocked.stdout
    assert run("check", "--gpus", "0", "--source", "exporter").returncode == 2, "no URL: a configuration error"
