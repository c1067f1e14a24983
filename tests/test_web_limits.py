"""What any client on the network can make the exporter do: refused credentials are a 401 and a
bounded log, and a crowd of clients costs a bounded number of collections, waiters and threads."""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
import pytest
import requests
from conftest import one
from prometheus_client import CollectorRegistry

from exporter.web.config import BCRYPT_MAX_PASSWORD, load_web_config
from exporter.web.server import ExporterServer, make_responder

REFUSED = "refused a request from"


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# Every kind of refusal a client can cause, each a 401.
BAD_CREDENTIALS = [
    {},
    {"Authorization": "Bearer token"},
    {"Authorization": "Basic !!!not-base64"},
    {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:x").decode()},
    _basic("nobody", "s3cret"),
    _basic("prometheus", "wrong"),
    _basic("prometheus", "x" * (BCRYPT_MAX_PASSWORD + 1)),
    _basic("nobody", "é" * BCRYPT_MAX_PASSWORD),
]


@pytest.fixture
def web_config(tmp_path):
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    return config


def test_every_refusal_is_a_401_and_one_log_line_without_a_traceback(exporter_factory, scenario, web_config):
    exporter = exporter_factory(scenario, "--web.config.file", str(web_config))
    long_password = _basic("prometheus", "p" * 100)
    answer = requests.get(exporter.url + "/metrics", headers=long_password, timeout=30)
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"].startswith("Basic")
    started = time.monotonic()
    for _ in range(10):
        for headers in BAD_CREDENTIALS:
            for path in ("/metrics", "/api/v1/gpus", "/"):
                assert requests.get(exporter.url + path, headers=headers, timeout=30).status_code == 401, headers
    elapsed = time.monotonic() - started
    assert requests.get(exporter.url + "/metrics", headers=_basic("prometheus", "s3cret"), timeout=30).ok
    log = exporter.log()
    lines = [line for line in log.splitlines() if REFUSED in line]
    assert lines and "longer than bcrypt's 72 bytes" in lines[0], log[-2000:]
    assert len(lines) <= 1 + elapsed // 60, f"{len(lines)} lines for 241 refusals in {elapsed:.0f}s"
    assert "Traceback" not in log and " ERROR " not in log
    assert "p" * 100 not in log and "s3cret" not in log, "no secret in the log"


def test_refusals_left_out_of_the_log_are_counted_on_the_next_line(web_config, caplog):
    interval = 0.3
    responder = make_responder(CollectorRegistry(), "/metrics", load_web_config(str(web_config)), None, interval)
    server = ExporterServer(responder, "127.0.0.1", 0, load_web_config(str(web_config)))
    server.start()
    url = "http://{}:{}/metrics".format(*server.address)
    caplog.set_level(logging.WARNING, logger="exporter.web.server")
    sent = 0
    try:
        deadline = time.monotonic() + 30
        while not any("more since the last such line" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "no line ever counted the ones left out"
            for headers in BAD_CREDENTIALS:
                assert requests.get(url, headers=headers, timeout=30).status_code == 401
                sent += 1
    finally:
        server.stop()
    lines = [r.getMessage() for r in caplog.records if REFUSED in r.getMessage()]
    counted = sum(int(m.group(1)) for line in lines if (m := re.search(r"\((\d+) more since", line)))
    assert len(lines) < sent / 4, f"{len(lines)} lines for {sent} refusals"
    assert sent - counted - len(lines) < len(BAD_CREDENTIALS) * 2, "every refusal is a line or in a count"


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE).group(1))


def _collections(exporter) -> float:
    return one(exporter.scrape(), "gpu_residency_collections_total")


CLIENTS = 64
CLOSE = {"Connection": "close"}


def test_64_clients_cost_one_collection_an_interval_and_a_bounded_number_of_waiters(exporter_factory, scenario):
    interval, places = 2.0, 4
    exporter = exporter_factory(
        scenario, "--collection.min-interval", str(interval), "--api.max-waiters", str(places),
        "--forensics.interval", "0",  # its own collections, once a second, would blur the count
    )  # fmt: skip
    url = exporter.url

    def read_gpus(stop: float) -> int:
        with requests.Session() as session:
            reads = 0
            while time.monotonic() < stop:
                body = session.get(url + "/api/v1/gpus", timeout=30).json()
                assert body["nvml_up"] and body["gpus"]
                reads += 1
            return reads

    before = _collections(exporter)
    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        reads = sum(pool.map(read_gpus, [started + 3 * interval] * CLIENTS))
    elapsed = time.monotonic() - started
    passes = _collections(exporter) - before - 1  # less the scrape that read the count
    assert reads > 4 * CLIENTS, "the clients were served"
    assert passes <= elapsed / interval + 2, f"{passes:.0f} NVML and /proc passes for {reads} reads in {elapsed:.1f}s"

    idle = _threads(exporter.proc.pid)
    wait_url = url + "/api/v1/exits?engine=nobody&wait=10"
    with ThreadPoolExecutor(CLIENTS) as pool:
        # Connection: close, as the project's own clients (urllib) do: a turned-away client leaves.
        answers = [pool.submit(requests.get, wait_url, headers=CLOSE, timeout=60) for _ in range(CLIENTS)]
        deadline = time.monotonic() + 8  # well inside the waiters' 10 s
        while sum(a.done() for a in answers) < CLIENTS - places:
            assert time.monotonic() < deadline, "the waiters beyond the limit were not turned away"
            time.sleep(0.05)
        refused = [a for a in answers if a.done()]
        assert all(a.result().status_code == 429 and a.result().headers["Retry-After"] == "1" for a in refused)
        while _threads(exporter.proc.pid) > idle + places + 2:
            assert time.monotonic() < deadline, f"{_threads(exporter.proc.pid)} threads, {idle} idle"
            time.sleep(0.05)
        assert sum(not a.done() for a in answers) == places, "the waiters within the limit still wait"
        assert requests.get(url + "/api/v1/exits", timeout=10).json() == {"exits": []}, "no wait: never refused"
        held = [a.result() for a in answers if a not in refused]
    assert all(r.status_code == 200 and r.json() == {"exits": []} for r in held)


def test_64_idle_connections_hold_no_more_threads_than_the_limit(exporter_factory, scenario):
    limit = 16
    exporter = exporter_factory(scenario, "--web.max-connections", str(limit))
    idle = _threads(exporter.proc.pid)
    host, port = exporter.url.removeprefix("http://").rsplit(":", 1)
    clients = [socket.create_connection((host, int(port)), timeout=10) for _ in range(CLIENTS)]  # and say nothing
    try:
        deadline = time.monotonic() + 20
        closed: set[int] = set()
        while len(closed) < CLIENTS - limit:
            assert time.monotonic() < deadline, f"{len(closed)} of the connections beyond {limit} closed"
            for index, client in enumerate(clients):
                if index not in closed and select.select([client], [], [], 0)[0] and not client.recv(1):
                    closed.add(index)
            time.sleep(0.05)
        assert _threads(exporter.proc.pid) <= idle + limit + 2, f"{_threads(exporter.proc.pid)} threads, {idle} idle"
    finally:
        for client in clients:
            client.close()
    deadline = time.monotonic() + 20
    while True:  # the places come back as the clients leave
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(exporter.url + "/healthz", headers=CLOSE, timeout=10).ok:
                break
        assert time.monotonic() < deadline, "the exporter never served again"
        time.sleep(0.05)
    lines = [line for line in exporter.log().splitlines() if "closed a connection from" in line]
    assert len(lines) == 1 and "--web.max-connections" in lines[0], lines
