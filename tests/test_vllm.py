"""vLLM: its own sleep state and KV-cache accounting, polled over real HTTP from a fake vLLM that
answers as three releases do (0.10.2: /is_sleeping only; 0.11.1 and 0.33.0: vllm:engine_sleep_state
on /metrics), hostile ones included."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import requests
from conftest import ROOT, gate_waiting_for, one, polled, scrape_families, scrape_until, values
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hardening import hostile_text

from exporter.engines.catalog import Engine
from exporter.errors import ErrorCounter
from exporter.pollers.http_fetch import FetchError
from exporter.pollers.poller import EnginePoller
from exporter.pollers.url_policy import UrlPolicy
from exporter.pollers.vllm import VllmPoller
from exporter.pollers.vllm_parse import MAX_RANKS, RESOURCES, ShapeError, parse_is_sleeping, parse_metrics
from exporter.registry import register_engine, set_engine_state
from fakenvml import GIB
from fakenvml.prometheus import free_port
from fakenvml.vllm import BLOCKS_PER_ENGINE, TOKENS_PER_ENGINE

RULES = ROOT / "dashboards" / "alerts.yaml"


def engine(name: str, url: str, up: bool = True, start: int = 1) -> Engine:
    return Engine(name=name, kind="vllm", url=url, source="registry", root_pid=1, start_ticks=start, up=up)


def new_poller(errors: ErrorCounter | None = None, **kwargs) -> VllmPoller:
    kwargs.setdefault("read_timeout", 1.0)
    return VllmPoller("n", errors or ErrorCounter(), UrlPolicy.default(), interval=0.05, **kwargs)


def poll_again(poller: VllmPoller, *engines: Engine) -> dict:
    time.sleep(0.06)  # past the poll interval
    return polled(poller, *engines)


# ---------- each release, as it answers ----------


def test_0_11_1_reports_its_sleep_state_and_level_on_metrics(fake_vllm):
    server = fake_vllm("0.11.1")
    poller = new_poller()
    e = engine("v", server.url)
    m = polled(poller, e)
    assert one(m, "gpu_residency_vllm_up", engine="v") == 1
    assert poller.observed([e])["v"].state == "active"
    assert values(m, "gpu_residency_vllm_sleep_level") == [], "absent while awake"
    assert one(m, "gpu_residency_vllm_kv_cache_usage_ratio", engine="v", dp_rank="0") == 0.25
    assert one(m, "gpu_residency_vllm_kv_cache_capacity_blocks", engine="v", dp_rank="0") == BLOCKS_PER_ENGINE
    assert one(m, "gpu_residency_vllm_kv_cache_block_size_tokens", engine="v", dp_rank="0") == 16
    assert values(m, "gpu_residency_vllm_kv_cache_capacity_tokens") == [], "no kv_cache_size_tokens before 0.24"
    assert server.requests == ["GET /metrics"], "the sleep state is on /metrics: /is_sleeping is not asked"

    server.sleep(level=1)
    m = poll_again(poller, e)
    seen = poller.observed([e])["v"]
    assert (seen.state, seen.level, seen.release_expected) == ("asleep", 1, True)
    assert one(m, "gpu_residency_vllm_sleep_level", engine="v") == 1
    server.wake_up()
    server.sleep(level=2)
    poll_again(poller, e)
    assert poller.observed([e])["v"].level == 2


def test_0_10_2_reports_through_is_sleeping_without_a_level(fake_vllm):
    server = fake_vllm("0.10.2")
    poller = new_poller()
    e = engine("old", server.url)
    m = polled(poller, e)
    assert server.requests == ["GET /metrics", "GET /is_sleeping"]
    assert poller.observed([e])["old"].state == "active"
    assert one(m, "gpu_residency_vllm_kv_cache_usage_ratio", engine="old", dp_rank="0") == 0.25
    server.sleep(level=2)
    m = poll_again(poller, e)
    seen = poller.observed([e])["old"]
    assert (seen.state, seen.level, seen.release_expected) == ("asleep", None, True)
    assert values(m, "gpu_residency_vllm_sleep_level") == [], "/is_sleeping does not say the level"


def test_without_dev_mode_there_is_accounting_but_no_observed_state(fake_vllm):
    server = fake_vllm("0.10.2", dev_mode=False)
    poller = new_poller()
    e = engine("plain", server.url)
    m = polled(poller, e)
    assert one(m, "gpu_residency_vllm_up", engine="plain") == 1
    assert one(m, "gpu_residency_vllm_kv_cache_capacity_blocks", engine="plain", dp_rank="0") == BLOCKS_PER_ENGINE
    assert poller.observed([e]) == {}
    poll_again(poller, e)
    assert server.requests == ["GET /metrics", "GET /is_sleeping", "GET /metrics"], "the 404 is remembered"


def test_0_33_0_capacity_in_tokens_data_parallel_and_level_0(fake_vllm):
    server = fake_vllm("0.33.0", dp_size=2)
    poller = new_poller()
    e = engine("new", server.url)
    m = polled(poller, e)
    for rank in ("0", "1"):
        assert one(m, "gpu_residency_vllm_kv_cache_capacity_tokens", engine="new", dp_rank=rank) == TOKENS_PER_ENGINE
        # vLLM's front end reports the blocks summed over its DP engines: published as it says.
        assert one(m, "gpu_residency_vllm_kv_cache_capacity_blocks", dp_rank=rank) == 2 * BLOCKS_PER_ENGINE
    server.sleep(level=0)  # scheduling paused: the memory stays, all three sleep states read 0
    m = poll_again(poller, e)
    seen = poller.observed([e])["new"]
    assert (seen.state, seen.level, seen.release_expected) == ("asleep", 0, False)
    assert one(m, "gpu_residency_vllm_sleep_level", engine="new") == 0


def test_a_partial_wake_is_awake_on_0_11_1_and_still_asleep_on_0_33_0(fake_vllm):
    """0.11.1 records awake on any wake (its quirk); 0.33.0 only once every tag is awake."""
    for version, expected in (("0.11.1", "active"), ("0.33.0", "asleep")):
        server = fake_vllm(version)
        poller = new_poller()
        e = engine(version, server.url)
        polled(poller, e)
        server.sleep(level=1)
        server.wake_up(["weights"])  # verl and OpenRLHF wake the weights, load new ones, then the KV cache
        poll_again(poller, e)
        assert poller.observed([e])[version].state == expected, version
        server.wake_up(["kv_cache"])
        poll_again(poller, e)
        assert poller.observed([e])[version].state == "active"


def test_the_fold_remembers_when_a_poll_first_saw_a_change(fake_vllm):
    server = fake_vllm("0.11.1")
    poller = new_poller()
    e = engine("v", server.url)
    polled(poller, e)
    first = poller.observed([e])["v"]
    assert first.since is None and first.before is None, "the first look: when it began is unknown"
    before = time.time()
    poll_again(poller, e)
    server.sleep(level=1)
    poll_again(poller, e)
    changed = poller.observed([e])["v"]
    assert changed.state == "asleep" and before < changed.before < changed.since <= time.time()
    assert poller.changes == 1
    poll_again(poller, e)
    assert poller.observed([e])["v"].since == changed.since and poller.changes == 1
    # A new process under the same name and URL inherits none of it.
    reborn = engine("v", server.url, start=2)
    poll_again(poller, reborn)
    assert poller.observed([reborn])["v"].since is None


# ---------- hostile engines ----------


@pytest.mark.parametrize(
    "version, mode, reason",
    [
        ("0.11.1", "hang", "timeout"),
        ("0.11.1", "trickle", "timeout"),
        ("0.11.1", "trickle_headers", "timeout"),
        ("0.11.1", "status500", "status"),
        ("0.11.1", "garbage", "bad_metrics"),
        ("0.11.1", "huge", "too_large"),
        ("0.11.1", "shape", "unexpected_shape"),
        ("0.10.2", "bad_is_sleeping", "bad_json"),
        ("0.10.2", "deep", "bad_json"),
    ],
)
def test_hostile_engines_lose_state_and_accounting_and_count_the_reason(fake_vllm, version, mode, reason):
    good, bad = fake_vllm("0.11.1"), fake_vllm(version, mode)
    errors = ErrorCounter()
    poller = new_poller(errors)
    engines = [engine("good", good.url), engine("bad", bad.url)]
    scrape_families(poller, *engines)
    started = time.monotonic()
    poller.poll_once()
    assert time.monotonic() - started < 5, "a poll is bounded by its deadline"
    m = scrape_families(poller, *engines)
    assert one(m, "gpu_residency_vllm_up", engine="bad") == 0
    for family in ("gpu_residency_vllm_kv_cache_usage_ratio", "gpu_residency_vllm_kv_cache_capacity_blocks",
                   "gpu_residency_vllm_sleep_level"):  # fmt: skip
        assert values(m, family, engine="bad") == []
    assert "bad" not in poller.observed(engines), "no state from an engine that did not answer"
    assert one(m, "gpu_residency_vllm_up", engine="good") == 1
    assert errors.snapshot()[("vllm", reason)] == 1


def test_every_request_of_a_poll_shares_one_deadline(fake_vllm):
    """A poll that needs two requests (/metrics, then /is_sleeping) is bounded by one deadline, not two."""
    hanging = fake_vllm("0.11.1", "hang")
    durations = []

    class TwoRequests:
        def poll(self, base_url, get):
            started = time.monotonic()
            with contextlib.suppress(FetchError):
                get(base_url + "/metrics")
            try:
                get(base_url + "/metrics")
            finally:
                durations.append(time.monotonic() - started)

        def forget(self, base_url):
            pass

    errors = ErrorCounter()
    poller = EnginePoller("t", ("vllm",), TwoRequests(), errors, UrlPolicy.default(), read_timeout=0.5)
    poller.track([engine("h", hanging.url)])
    poller.poll_once()
    assert len(durations) == 1 and durations[0] < 1.5 + 0.5, durations  # 1 s connect + 0.5 s read, once
    assert errors.snapshot()[("t", "timeout")] == 1


def test_urls_outside_the_allowed_hosts_are_never_requested():
    errors = ErrorCounter()
    poller = new_poller(errors)
    refused = [engine("remote", "http://192.0.2.10:8000"), engine("path", "http://127.0.0.1:8000/metrics")]
    scrape_families(poller, *refused)
    poller.poll_once()
    assert errors.snapshot()[("vllm", "url_not_allowed")] == 2
    assert poller.observed(refused) == {}


def test_only_vllm_engines_are_polled(fake_vllm):
    server = fake_vllm("0.11.1")
    poller = new_poller()
    sglang = Engine(name="s", kind="sglang", url=server.url, source="registry", root_pid=1, start_ticks=1, up=True)
    assert values(polled(poller, sglang), "gpu_residency_vllm_up") == [] and server.requests == []


# ---------- the parsers ----------


def metrics_text(*lines: str) -> str:
    return "\n".join(lines) + "\n"


def sleep_lines(engine_index: str, awake: float, offloaded: float, discarded: float) -> list[str]:
    name = "vllm:engine_sleep_state"
    states = (("awake", awake), ("weights_offloaded", offloaded), ("discard_all", discarded))
    return [
        f'{name}{{engine="{engine_index}",model_name="m",sleep_state="{state}"}} {value}' for state, value in states
    ]


def test_metrics_parser_reads_states_by_name_and_refuses_what_vllm_never_sends():
    report = parse_metrics(metrics_text(*sleep_lines("0", 0, 0, 1), *sleep_lines("1", 0, 0, 1)))
    ranks, sleep = report.ranks, report.sleep
    assert sleep.sleeping and sleep.level == 2 and [r.dp_rank for r in ranks] == ["0", "1"]
    assert parse_metrics(metrics_text(*sleep_lines("0", 0, 0, 0))).sleep.level == 0
    # One DP engine still awake: the server is not asleep (that engine holds its memory).
    assert not parse_metrics(metrics_text(*sleep_lines("0", 0, 1, 0), *sleep_lines("1", 1, 0, 0))).sleep.sleeping
    assert parse_metrics(metrics_text('vllm:num_requests_running{engine="0"} 0')).sleep is None
    for bad in (sleep_lines("0", 1, 1, 0), sleep_lines("0", 0, 1, 1), sleep_lines("0", 0.5, 0, 0),
                sleep_lines("zero", 1, 0, 0), sleep_lines("0", float("nan"), 0, 0),
                sleep_lines("0", 1, 0, 0)[1:]):  # fmt: skip
        with pytest.raises(ShapeError):
            parse_metrics(metrics_text(*bad))
    many = [line for rank in range(MAX_RANKS + 1) for line in sleep_lines(str(rank), 1, 0, 0)]
    with pytest.raises(ShapeError, match="engines in one server"):
        parse_metrics(metrics_text(*many))
    with pytest.raises(ValueError):
        parse_metrics(b"<html>\x00\xff{")


def test_metrics_parser_falls_back_to_the_old_usage_name_and_drops_what_is_not_a_count():
    ranks = parse_metrics(
        metrics_text(
            'vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.5',
            'vllm:kv_cache_usage_perc{engine="1",model_name="m"} NaN',
            'vllm:gpu_cache_usage_perc{engine="1",model_name="m"} 0.75',
            'vllm:kv_cache_usage_perc{engine="2",model_name="m"} 1.5',
            'vllm:cache_config_info{block_size="16",engine="0",kv_cache_size_tokens="None",num_gpu_blocks="-3"} 1.0',
        )
    ).ranks
    by_rank = {r.dp_rank: r for r in ranks}
    assert by_rank["0"].kv_usage == 0.5 and by_rank["0"].block_size == 16
    assert by_rank["0"].tokens is None and by_rank["0"].blocks is None
    assert by_rank["1"].kv_usage is None, "the current name wins, and NaN is no figure"
    assert by_rank["2"].kv_usage is None, "a ratio over 1 is no figure"


def test_is_sleeping_parser():
    assert parse_is_sleeping(b'{"is_sleeping": true}').sleeping
    assert not parse_is_sleeping(b'{"is_sleeping": false}').sleeping
    for body in (b'{"is_sleeping": "yes"}', b"[]", b'{"is_sleeping": 1}'):
        with pytest.raises(ShapeError):
            parse_is_sleeping(body)
    with pytest.raises(ValueError):
        parse_is_sleeping(b"[" * 5000 + b"]" * 5000)


metric_names = st.sampled_from(["vllm:engine_sleep_state", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
                                "vllm:cache_config_info", "vllm:other", "x", "vllm:engine_sleep_resource_state",
                                "vllm:engine_fully_awake", "vllm:rl_sleep_mode_operation_duration_seconds_bucket",
                                "vllm:rl_sleep_mode_operation_duration_seconds_sum",
                                "vllm:rl_sleep_mode_operation_duration_seconds_count",
                                "vllm:sleep_mode_operations_in_flight"])  # fmt: skip
label_names = st.sampled_from(["engine", "sleep_state", "model_name", "num_gpu_blocks", "block_size",
                               "kv_cache_size_tokens", "resource", "state", "operation", "le"])  # fmt: skip
label_values = st.sampled_from(["0", "1", "65", "awake", "weights_offloaded", "discard_all", "None", "16", "-1",
                                "99999999999999999999", "x\\\"y", "", "weights", "kv_cache", "scheduler",
                                "unknown", "resident", "released", "offloaded", "paused", "sleep", "wake",
                                "+Inf"]) | st.text(max_size=8)  # fmt: skip
sample_values = st.sampled_from(["0", "1", "2", "0.5", "-1", "NaN", "+Inf", "1e308", "x", ""])
sample_lines = st.builds(
    lambda name, labels, value: name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "} " + value,
    metric_names,
    st.dictionaries(label_names, label_values, max_size=4),
    sample_values,
)
metrics_bodies = st.lists(
    sample_lines | st.sampled_from(["# TYPE vllm:engine_sleep_state gauge", "# HELP x y", "# TYPE x counter", ""]),
    max_size=30,
).map(lambda lines: "\n".join(lines) + "\n")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metrics_bodies)
def test_metrics_parser_never_crashes_and_never_invents(body):
    try:
        report = parse_metrics(body)
    except ValueError:  # ShapeError included
        return
    assert len(report.ranks) <= MAX_RANKS
    for rank in report.ranks:
        assert rank.dp_rank.isdigit()
        assert rank.kv_usage is None or 0 <= rank.kv_usage <= 1
        for count in (rank.blocks, rank.block_size, rank.tokens):
            assert count is None or (isinstance(count, int) and count >= 0)
        assert all(state in RESOURCES[resource] for resource, state in rank.resources)
    sleep = report.sleep
    if sleep is not None and sleep.unknown:
        assert sleep.sleeping and sleep.level is None, "unknown is never awake, never a known level"
    else:
        assert sleep is None or (sleep.level in (0, 1, 2) if sleep.sleeping else sleep.level is None)
    for timing in report.timings.values():
        assert timing.buckets[-1][0] == "+Inf" and timing.count >= 0 and timing.sum >= 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(hostile_text)
def test_vllm_parsers_take_any_body(text):
    for parse in (parse_metrics, parse_is_sleeping):
        with contextlib.suppress(ValueError):
            parse(text.encode())


# ---------- end to end: the exporter process, a fake `vllm serve` tree, the fake NVML ----------


def _hold(scenario, pids: list[int], gib: float) -> None:
    for gpu, pid in zip(scenario.gpus, pids, strict=False):
        gpu.processes = [(pid, int(gib * GIB))]
        gpu.used = int(gib * GIB) + GIB // 4
    scenario.write()


def _start(exporter_factory, scenario, tmp_path, *extra: str):
    return exporter_factory(
        scenario, "--registry.dir", str(tmp_path / "reg"), "--engines.discovery-interval", "0.5",
        "--vllm.poll-interval", "0.2", "--engines.state-interval", "0.1", *extra,
    )  # fmt: skip


def test_a_vllm_engine_that_sleeps_and_frees_its_memory_2s_later_records_a_2s_release_with_no_framework_call(
    exporter_factory, scenario, vllm_serve, tmp_path
):
    port = free_port()
    served = vllm_serve("Qwen/Qwen3-8B", "--port", str(port), "--tensor-parallel-size", "2", "--enable-sleep-mode")
    name = f"vllm-{port}-{served.pid}"  # discovered: kind, port and the launch process's PID
    _hold(scenario, served.workers, 20)
    exporter = _start(exporter_factory, scenario, tmp_path)
    # Each concern reads the poller's latest result when its families are built: in the scrape that
    # first sees the state, the vLLM families (built earlier) may still predate the first poll.
    m = scrape_until(
        exporter,
        lambda m: (
            values(m, "gpu_residency_engine_state", engine=name, state="active") == [1]
            and values(m, "gpu_residency_vllm_kv_cache_usage_ratio", engine=name, dp_rank="0") != []
        ),
    )
    # Discovered from its command line; its workers, two levels down, are its memory.
    assert one(m, "gpu_residency_engine_up", engine=name, kind="vllm") == 1
    assert one(m, "gpu_residency_engine_state", engine=name, state="active", source="observed") == 1
    for rank, pid in enumerate(served.workers):
        labels = {"pid": pid, "engine": name, "comm": f"VLLM::Worker_TP{rank}", "holder": name, "holder_kind": "vllm"}
        assert one(m, "gpu_residency_process_memory_bytes", **labels) == 20 * GIB
    assert one(m, "gpu_residency_vllm_kv_cache_usage_ratio", engine=name, dp_rank="0") == 0.25

    # What verl's and OpenRLHF's rollout workers do; nobody tells the exporter.
    assert requests.post(f"{served.url}/sleep?level=1", timeout=5).status_code == 200
    threading.Timer(2.0, _hold, (scenario, served.workers, 1.0)).start()  # the driver frees it 2 s later
    m = scrape_until(exporter, lambda m: values(m, "gpu_residency_engine_release_seconds_count", engine=name) == [1])
    released = one(m, "gpu_residency_engine_release_seconds_sum", engine=name)
    assert 1.5 <= released <= 2.6, released  # timed from the poll (every 0.2 s) that saw the sleep
    assert one(m, "gpu_residency_engine_state", engine=name, state="asleep", source="observed") == 1
    assert one(m, "gpu_residency_vllm_sleep_level", engine=name) == 1
    assert one(m, "gpu_residency_engine_release_timeouts_total", engine=name) == 0
    # An observed sleep is a cycle too: what each worker still held when the release completed.
    assert one(m, "gpu_residency_engine_release_cycles_total", engine=name) == 1
    assert values(m, "gpu_residency_engine_release_residual_bytes", engine=name) == [1 * GIB, 1 * GIB]

    assert requests.post(f"{served.url}/wake_up", timeout=5).status_code == 200
    threading.Timer(1.0, _hold, (scenario, served.workers, 19)).start()
    m = scrape_until(exporter, lambda m: values(m, "gpu_residency_engine_wake_seconds_count", engine=name) == [1])
    assert 0.6 <= one(m, "gpu_residency_engine_wake_seconds_sum", engine=name) <= 1.6
    assert values(m, "gpu_residency_vllm_sleep_level", engine=name) == []


def test_a_vllm_engine_asleep_while_its_memory_stays_times_out_naming_its_processes_alerts_and_gates(
    exporter_factory, scenario, vllm_serve, tmp_path, prometheus_factory
):
    """0.33.0 this time; its memory never goes (sleep mode off: /sleep frees nothing)."""
    port = free_port()
    served = vllm_serve("m", "--port", str(port), "--tensor-parallel-size", "2", "--fake-version", "0.33.0")
    name = f"vllm-{port}-{served.pid}"  # discovered: kind, port and the launch process's PID
    _hold(scenario, served.workers, 20)
    exporter = _start(exporter_factory, scenario, tmp_path, "--engines.release-timeout", "1")
    prometheus = prometheus_factory([exporter.url.removeprefix("http://")], rule_files=[RULES])
    prometheus.wait_for(f'gpu_residency_engine_release_timeouts_total{{engine="{name}"}} == 0')

    assert requests.post(f"{served.url}/sleep?level=1", timeout=5).json() == {"status": "sleeping", "level": 1}
    m = scrape_until(exporter, lambda m: values(m, "gpu_residency_engine_release_timeouts_total", engine=name) == [1])
    assert values(m, "gpu_residency_engine_release_seconds_count", engine=name) == []
    log = exporter.log()
    assert f"engine {name}: release not complete after 1s (state reported by the engine" in log
    for rank, pid in enumerate(served.workers):
        assert f"pid {pid} VLLM::Worker_TP{rank} 20.0 GiB on GPU {rank}" in log

    # The release-timeout alert fires on the engine's first timeout, on a real Prometheus.
    prometheus.wait_for(f'ALERTS{{alertname="GpuEngineReleaseTimedOut",engine="{name}",alertstate="firing"}}')
    # The gate, waiting for that engine's release, names its processes.
    gate = gate_waiting_for(scenario, name, "0,1", "2", "--source", "prometheus", "--prometheus-url", prometheus.url)
    assert gate.returncode == 1, gate.stdout + gate.stderr
    w0, w1 = served.workers
    assert (
        f"waiting for engine {name}'s release: {name} still holds 20.0 GiB on GPU 0 (pid {w0} VLLM::Worker_TP0); "
        f"20.0 GiB on GPU 1 (pid {w1} VLLM::Worker_TP1)"
    ) in gate.stdout, gate.stdout


def test_a_framework_state_the_engine_contradicts_is_counted(exporter_factory, scenario, vllm_serve, tmp_path):
    """The framework marks the engine asleep, but the engine never slept: its memory is not free."""
    served = vllm_serve("m", "--port", str(free_port()))
    register_engine("rollout-v", root_pid=served.pid, kind="vllm", url=served.url, directory=tmp_path / "reg",
                    state="active")  # fmt: skip
    _hold(scenario, served.workers, 20)
    exporter = _start(exporter_factory, scenario, tmp_path, "--engines.state-mismatch-grace", "0.5")
    labels = {"engine": "rollout-v", "framework": "active", "observed": "active"}
    scrape_until(exporter, lambda m: values(m, "gpu_residency_engine_state_mismatch", **labels) == [0])
    set_engine_state("rollout-v", "asleep", tmp_path / "reg")  # and /sleep was never called
    labels["framework"] = "asleep"
    m = scrape_until(exporter, lambda m: values(m, "gpu_residency_engine_state_mismatch", **labels) == [1])
    assert one(m, "gpu_residency_engine_state_mismatches_total", **labels) == 1
    assert one(m, "gpu_residency_engine_state", engine="rollout-v", state="active", source="observed") == 1
    assert values(m, "gpu_residency_engine_release_seconds_count", engine="rollout-v") == []
