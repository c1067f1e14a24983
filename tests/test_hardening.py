"""Hardening: load, soak, faults, hostile input and security. Bounded in time, loopback only."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import bcrypt
import pytest
import requests
from conftest import ROOT, one, scrape_until, values
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.exits import ExitEvent, report_exit
from exporter.pollers.sglang_metrics import parse_metrics as parse_sglang_metrics
from exporter.pollers.sglang_parse import ShapeError, parse_server_info
from exporter.registry import EngineEntry, RegistryError, register_engine, unregister_engine
from fakenvml import GIB, GPU_IS_LOST
from gate.prometheus_source import METRICS, USED, build_query

# Families whose series legitimately accumulate (counters of events) or change every scrape.
COUNTED = ("gpu_residency_engine_exits", "gpu_residency_errors", "gpu_residency_collections", "gpu_residency_scrape")
SOAK_SECONDS = float(os.environ.get("GPU_RESIDENCY_SOAK_SECONDS", "45"))


def _proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1], 16 if key.startswith("Cap") else 10)
    raise KeyError(key)


# ---------- load ----------


@pytest.mark.slow
def test_fifty_concurrent_scrapers_for_twenty_seconds(exporter_factory, scenario, spawn_tree, tmp_path):
    tree = spawn_tree(leaves=2)
    register_engine("e", root_pid=tree.pid, directory=tmp_path / "reg")
    scenario.gpus[0].processes = [(tree.leaves[0], GIB)]
    scenario.write()
    exporter = exporter_factory(scenario, "--registry.dir", str(tmp_path / "reg"), "--no-engines.discover")
    latencies: list[float] = []
    failures: list[str] = []
    deadline = time.monotonic() + 20

    def scraper() -> None:
        session = requests.Session()
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                response = session.get(exporter.url + "/metrics", timeout=10)
                if response.status_code != 200 or "gpu_residency_engine_memory_bytes" not in response.text:
                    failures.append(f"status {response.status_code}")
            except requests.RequestException as exc:
                failures.append(repr(exc))
            latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=scraper) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures[:5]
    latencies.sort()
    p99 = latencies[int(0.99 * len(latencies))]
    assert len(latencies) > 500 and p99 < 2.0, (len(latencies), p99)
    m = exporter.scrape()
    collections = 1 + 20 / 0.25  # the default --collection.min-interval
    assert one(m, "gpu_residency_collections_total") <= collections + 5, "scrapes share collections"
    print(f"load: {len(latencies)} scrapes, median {statistics.median(latencies) * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms")


# ---------- soak ----------


@pytest.mark.slow
def test_soak_churn_leaks_no_memory_series_or_threads(exporter_factory, scenario, spawn_tree, tmp_path):
    registry = tmp_path / "reg"
    scenario.gpus = scenario.gpus[:2]
    stable = spawn_tree()
    register_engine("stable", root_pid=stable.pid, directory=registry)
    scenario.gpus[0].processes = [(stable.leaves[0], GIB)]
    scenario.write()
    exporter = exporter_factory(scenario, "--registry.dir", str(registry), "--exits.grace-period", "0.5")

    def series() -> set[str]:
        text = requests.get(exporter.url + "/metrics", timeout=10).text
        return {
            line.rsplit(" ", 1)[0]
            for line in text.splitlines()
            if line and not line.startswith(("#", *COUNTED))
        }  # fmt: skip

    warm_until = time.monotonic() + 3
    while time.monotonic() < warm_until:
        series()
    baseline = series()
    rss_start = _proc_status(exporter.proc.pid, "VmRSS")
    threads_start = _proc_status(exporter.proc.pid, "Threads")
    rng = random.Random(7)
    deadline = time.monotonic() + SOAK_SECONDS
    round_number = 0
    while time.monotonic() < deadline:
        round_number += 1
        tree = spawn_tree(leaves=2)
        name = f"churn-{round_number}"
        register_engine(name, root_pid=tree.pid, directory=registry)
        scenario.gpus[1].processes = [(tree.leaves[0], rng.randint(1, 8) * GIB), (tree.leaves[1], GIB)]
        scenario.gpus[1].used = 10 * GIB
        scenario.write()
        series()
        if round_number % 3 == 0:
            tree.root.kill()  # a crash nobody reports: counted as unknown once
        else:
            report_exit(name, -9 if round_number % 3 == 1 else 0, directory=registry)
            tree.root.terminate()
        tree.root.wait(timeout=10)
        time.sleep(0.6)
        series()
        unregister_engine(name, registry)
        scenario.gpus[1].processes = []
        scenario.gpus[1].used = 0
        scenario.write()
        time.sleep(0.3)
    final = series()
    rss_growth_kib = _proc_status(exporter.proc.pid, "VmRSS") - rss_start
    threads_end = _proc_status(exporter.proc.pid, "Threads")
    print(f"soak: {round_number} rounds, RSS +{rss_growth_kib} KiB, threads {threads_start}->{threads_end}")
    assert final == baseline, final ^ baseline
    assert rss_growth_kib < 5 * 1024
    assert threads_end <= threads_start + 2
    m = exporter.scrape()
    reported = round_number - round_number // 3
    assert sum(values(m, "gpu_residency_engine_exits_total")) >= reported, "every reported exit is counted"
    history = one(m, "gpu_residency_forensics_history_collections")
    print(f"soak: forensics history {history:.0f} collections (bound 240)")
    assert 0 < history <= 240, "the crash forensics' history stays bounded"


# ---------- faults ----------


def test_gpu_lost_mid_run_and_recovered(exporter_factory, scenario):
    scenario.gpus[1].used = 3 * GIB
    scenario.write()
    exporter = exporter_factory(scenario, "--collection.min-interval", "0")
    assert one(exporter.scrape(), "gpu_residency_memory_used_bytes", gpu=1) == 3 * GIB
    scenario.gpus[1].errors = {"memory": GPU_IS_LOST, "processes": GPU_IS_LOST}
    scenario.write()
    m = exporter.scrape()
    assert values(m, "gpu_residency_memory_used_bytes", gpu=1) == [] and one(m, "gpu_residency_nvml_up") == 1
    assert one(m, "gpu_residency_errors_total", source="nvml", reason="gpu_is_lost") >= 1
    scenario.gpus[1].errors = {}
    scenario.write()
    assert one(exporter.scrape(), "gpu_residency_memory_used_bytes", gpu=1) == 3 * GIB


def test_truncated_or_restored_events_file_loses_and_doubles_nothing(local_exporter):
    registry = local_exporter.registry_dir
    for _ in range(3):
        report_exit("t", -9, directory=registry)
    assert one(local_exporter.scrape(), "gpu_residency_engine_exits_total", engine="t") == 3
    saved = (registry / "events.jsonl").read_bytes()
    (registry / "events.jsonl").write_text("")
    report_exit("t", 1, directory=registry)
    m = local_exporter.scrape()
    assert one(m, "gpu_residency_engine_exits_total", engine="t", exit_code="1") == 1
    assert one(m, "gpu_residency_engine_exits_total", engine="t", exit_code="-9") == 3, "counted exits stay counted"
    (registry / "events.jsonl").write_bytes(saved)  # an old copy put back: the same events, not new ones
    m = local_exporter.scrape()
    assert one(m, "gpu_residency_engine_exits_total", engine="t", exit_code="-9") == 3


# ---------- hostile input (property-based) ----------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
# Deep nesting (up to 20,000 levels, far past the interpreter's recursion limit) and large
# bodies (up to 2 MiB), as raw text: the shapes json_values cannot reach.
deep_json = st.builds(
    lambda depth, opener, inner: opener * depth + inner + {"[": "]", '{"a":': "}"}[opener] * depth,
    st.integers(1, 20_000),
    st.sampled_from(["[", '{"a":']),
    st.sampled_from(["1", '"x"', "[]", "{}", "null"]),
)
large_json = st.builds(lambda size, key: json.dumps({key: "x" * size}), st.integers(0, 2 * 1024 * 1024),
                       st.sampled_from(["url", "name", "internal_states", "pad"]))  # fmt: skip
hostile_text = st.one_of(json_values.map(json.dumps), deep_json, large_json, st.text(max_size=200))
memory_usage = st.dictionaries(
    st.sampled_from(["weight", "kvcache", "graph", "cuda_graph", "token_capacity", "startup_available", "x"]),
    json_values,
    max_size=7,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.fixed_dictionaries({"internal_states": st.lists(
    st.fixed_dictionaries({"memory_usage": memory_usage}) | json_values, max_size=3)})))  # fmt: skip
def test_server_info_parser_never_crashes_and_never_invents(body):
    import json

    try:
        ranks = parse_server_info(json.dumps(body))
    except ShapeError:
        return
    except ValueError:
        return  # not JSON (NaN is not JSON for strict parsers)
    for rank in ranks:
        for value in rank.components.values():
            assert value >= 0 and value == value and value != float("inf")
        assert rank.token_capacity is None or (isinstance(rank.token_capacity, int) and rank.token_capacity >= 0)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(hostile_text)
def test_server_info_parser_takes_deep_and_large_bodies(text):
    for parse in (parse_server_info, parse_sglang_metrics):  # /server_info, and /metrics where that is absent
        with contextlib.suppress(ValueError):  # ShapeError is a ValueError; so is "not JSON" and "nested too deep"
            parse(text.encode())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(hostile_text)
def test_registry_event_and_gate_record_parsers_only_raise_their_own_errors(text):
    with contextlib.suppress(RegistryError):
        EngineEntry.from_json(text)
    with contextlib.suppress(ValueError):
        ExitEvent.from_json(text)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(hostile_text)
def test_gate_record_files_of_any_shape_are_read_or_refused(tmp_path, text):
    from exporter.sleep_wake.gate_records import read_record
    from gpu_residency_common.files import UntrustedFileError

    path = tmp_path / "record.json"
    path.write_text(text)
    try:
        clear, when = read_record(path)
    except UntrustedFileError as exc:
        assert exc.reason in ("malformed", "too_large")
    else:
        assert isinstance(clear, bool) and when == when


prometheus_results = st.lists(
    st.fixed_dictionaries({
        "metric": st.dictionaries(st.sampled_from(["__name__", "uuid", "gpu", "gate_field", "engine", "pid"]),
                                  st.sampled_from(["gpu_residency_memory_used_bytes", "sample_time", "0", "x", ""]),
                                  max_size=6),
        "value": st.tuples(st.floats(allow_nan=True) | st.text(max_size=5), st.text(max_size=12) | st.floats()),
    }) | json_values,
    max_size=6,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({"status": st.sampled_from(["success", "error"]), "data": st.fixed_dictionaries(
    {"resultType": st.sampled_from(["vector", "matrix"]), "result": prometheus_results})}) | json_values)  # fmt: skip
def test_gate_prometheus_answers_of_any_shape_are_samples_or_a_source_error(payload):
    from gate.prometheus_source import SourceError, samples_from_answer

    try:
        samples = samples_from_answer(payload)
    except SourceError:
        return
    for sample in samples:
        assert sample.age_seconds >= 0 and isinstance(sample.used_bytes, int)


def _unescape(value: str) -> str:
    out, index = [], 0
    while index < len(value):
        char = value[index]
        if char == "\\":
            index += 1
            char = {"n": "\n"}.get(value[index], value[index])
        out.append(char)
        index += 1
    return "".join(out)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=60))
def test_gate_query_keeps_any_node_string_inside_its_label_value(node):
    query = build_query(node)
    names = "|".join(METRICS)
    prefix = f'{{__name__=~"{names}",node="'
    middle = f'"}} or label_replace(timestamp({{__name__=~"{"|".join(USED)}",node="'
    suffix = '"}), "gate_field", "sample_time", "", "")'
    assert query.startswith(prefix) and query.endswith(suffix) and middle in query
    first, second = query[len(prefix) : -len(suffix)].split(middle)
    assert first == second
    # No unescaped quote can end the string early, and the literal means exactly the node.
    index = 0
    while index < len(first):
        if first[index] == "\\":
            index += 2
            continue
        assert first[index] != '"'
        index += 1
    assert _unescape(first) == node


# ---------- security ----------


def test_no_command_line_argument_or_environment_ever_reaches_output(exporter_factory, scenario, tmp_path):
    secret_arg, secret_env = "SECRET-ARGV-3141", "SECRET-ENV-2718"
    code = "import time; time.sleep(60)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "-m", "sglang.launch_server", "--port", "31999", "--api-key", secret_arg],
        env=dict(os.environ, HF_TOKEN=secret_env),
    )
    try:
        register_engine("reg", root_pid=proc.pid, directory=tmp_path / "reg", url="http://127.0.0.1:31999")
        scenario.gpus[0].processes = [(proc.pid, GIB)]
        scenario.write()
        exporter = exporter_factory(scenario, "--registry.dir", str(tmp_path / "reg"), "--log.level", "debug")
        other = exporter_factory(
            scenario, "--registry.dir", str(tmp_path / "none"), "--engines.discovery-interval", "0.2"
        )
        discovered = f"sglang-31999-{proc.pid}"
        scrape_until(other, lambda m: values(m, "gpu_residency_engine_up", engine=discovered) == [1])
        bodies = [
            requests.get(e.url + path, timeout=10).text
            for e in (exporter, other)
            for path in ("/metrics", "/", "/healthz", "/api/v1/gpus", "/api/v1/wait?gpus=0&threshold_bytes=1&timeout=0")
        ]
        for text in [*bodies, exporter.log(), other.log()]:
            assert secret_arg not in text and secret_env not in text and "--api-key" not in text
    finally:
        proc.kill()
        proc.wait()


def test_tls_and_basic_auth(exporter_factory, scenario, tls_files, tmp_path):
    cert, key = tls_files
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(
        f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\nbasic_auth_users:\n  prometheus: '{hashed}'\n"
    )
    exporter = exporter_factory(scenario, "--web.config.file", str(config))
    assert exporter.url.startswith("https://")
    get = lambda path, **kw: requests.get(exporter.url + path, verify=str(cert), timeout=10, **kw)  # noqa: E731
    assert get("/metrics").status_code == 401
    assert get("/metrics", auth=("prometheus", "wrong")).status_code == 401
    assert get("/metrics", auth=("nobody", "s3cret")).status_code == 401
    ok = get("/metrics", auth=("prometheus", "s3cret"))
    assert ok.status_code == 200 and "gpu_residency_memory_used_bytes" in ok.text
    assert get("/healthz").status_code == 200, "probes need no credentials"
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(exporter.url.replace("https", "http") + "/metrics", timeout=5)
    header = "Basic " + base64.b64encode(b"prometheus:s3cret").decode()
    assert get("/", headers={"Authorization": header}).status_code == 200


@pytest.mark.parametrize(
    "body, message",
    [
        ("tls_server_config:\n  cert_file: /nope\n", "missing key_file"),
        ("tls_server_config:\n  cert_file: /nope.crt\n  key_file: /nope.key\n", "tls_server_config"),
        ("basic_auth_users:\n  u: plaintext\n", "not a bcrypt hash"),
        ("surprise: 1\n", "unknown keys"),
        (": : :\n", "not valid YAML"),
    ],
)
def test_bad_web_config_is_a_clear_error(tmp_path, body, message):
    config = tmp_path / "web.yml"
    config.write_text(body)
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--web.config.file", str(config)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
