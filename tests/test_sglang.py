"""SGLang /server_info accounting against a fake SGLang over real HTTP, hostile ones included."""

from __future__ import annotations

import json
import time

import pytest
from conftest import one, polled, scrape_families, values

from exporter.engines.catalog import Engine
from exporter.errors import ErrorCounter
from exporter.pollers.sglang import SglangPoller
from exporter.pollers.sglang_metrics import parse_metrics
from exporter.pollers.sglang_parse import GIB, ShapeError, parse_server_info
from exporter.pollers.url_policy import UrlPolicy
from fakenvml.sglang import metrics, server_info


def engine(name: str, url: str, up: bool = True) -> Engine:
    return Engine(name=name, kind="sglang", url=url, source="registry", root_pid=1, start_ticks=None, up=up)


def new_poller(errors: ErrorCounter | None = None, **kwargs) -> SglangPoller:
    kwargs.setdefault("read_timeout", 1.0)
    return SglangPoller("n", errors or ErrorCounter(), UrlPolicy.default(), interval=0.2, **kwargs)


def test_new_release_with_dp2_publishes_every_component_per_rank(fake_sglang):
    server = fake_sglang("new", dp_size=2)
    poller = new_poller()
    e = engine("rollout-0", server.url)
    m = polled(poller, e)
    assert one(m, "gpu_residency_sglang_up", engine="rollout-0") == 1
    for rank in ("0", "1"):
        assert one(m, "gpu_residency_sglang_memory_bytes", dp_rank=rank, component="weight") == 14.5 * GIB
        assert one(m, "gpu_residency_sglang_memory_bytes", dp_rank=rank, component="graph") == 1.25 * GIB
    assert one(m, "gpu_residency_sglang_memory_bytes", dp_rank="1", component="kvcache") == 56.25 * GIB
    assert one(m, "gpu_residency_sglang_token_capacity", dp_rank="1") == 901_235
    assert server.requests == ["/server_info"]


def test_old_release_falls_back_to_get_server_info_and_has_no_weight_or_graph(fake_sglang):
    server = fake_sglang("old")
    poller = new_poller()
    e = engine("old", server.url)
    m = polled(poller, e)
    assert one(m, "gpu_residency_sglang_memory_bytes", component="kvcache") == 55.25 * GIB
    assert values(m, "gpu_residency_sglang_memory_bytes", component="weight") == []
    assert values(m, "gpu_residency_sglang_memory_bytes", component="graph") == []
    assert one(m, "gpu_residency_sglang_token_capacity", dp_rank="0") == 901_234
    assert server.requests == ["/server_info", "/get_server_info"]
    time.sleep(0.25)
    poller.poll_once()
    assert server.requests[-1] == "/get_server_info", "the working path is remembered"


def test_mid_release_reads_cuda_graph(fake_sglang):
    server = fake_sglang("mid")
    poller = new_poller()
    e = engine("mid", server.url)
    assert one(polled(poller, e), "gpu_residency_sglang_memory_bytes", component="graph") == 1.25 * GIB


@pytest.mark.parametrize(
    "mode, reason",
    [
        ("hang", "timeout"),
        ("trickle", "timeout"),
        ("status500", "status"),
        ("garbage", "bad_json"),
        ("huge", "too_large"),
        ("shape", "unexpected_shape"),
    ],
)
def test_hostile_engines_drop_accounting_and_count_the_reason(fake_sglang, mode, reason):
    good, bad = fake_sglang("new"), fake_sglang(mode)
    errors = ErrorCounter()
    poller = new_poller(errors)
    engines = [engine("good", good.url), engine("bad", bad.url)]
    scrape_families(poller, *engines)
    started = time.monotonic()
    poller.poll_once()
    assert time.monotonic() - started < 5, "a poll is bounded by its deadline"
    m = scrape_families(poller, *engines)
    assert one(m, "gpu_residency_sglang_up", engine="bad") == 0
    assert values(m, "gpu_residency_sglang_memory_bytes", engine="bad") == []
    assert values(m, "gpu_residency_sglang_token_capacity", engine="bad") == []
    assert one(m, "gpu_residency_sglang_up", engine="good") == 1
    assert errors.snapshot()[("sglang", reason)] == 1


def test_a_scrape_never_waits_on_a_hanging_engine(fake_sglang):
    hanging = fake_sglang("hang")
    poller = new_poller(read_timeout=2.0)
    e = engine("h", hanging.url)
    scrape_families(poller, e)
    poller.start()
    try:
        time.sleep(0.3)  # the background poll is now stuck on the engine
        started = time.monotonic()
        m = scrape_families(poller, e)
        assert time.monotonic() - started < 0.2
        assert values(m, "gpu_residency_sglang_up", engine="h") == [], "not yet known: absent, not 0"
    finally:
        poller.stop()


def test_failures_back_off(fake_sglang):
    bad = fake_sglang("status500")
    poller = new_poller()
    e = engine("b", bad.url)
    scrape_families(poller, e)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        poller.poll_once()
        time.sleep(0.05)
    # interval 0.2 s, doubling per failure: 0, 0.2, 0.6, 1.4 -> at most 4 attempts in 2 s (not 40)
    assert 2 <= len(bad.requests) <= 5, bad.requests


def test_urls_outside_the_allowed_hosts_are_never_requested(fake_sglang):
    errors = ErrorCounter()
    poller = new_poller(errors)
    refused = [
        engine("remote", "http://192.0.2.10:30000"),
        engine("name", "http://attacker.example:30000"),
        engine("scheme", "file:///etc/passwd"),
        engine("creds", "http://user:pw@127.0.0.1:1"),
    ]
    m = scrape_families(poller, *refused)
    poller.poll_once()
    assert values(m, "gpu_residency_sglang_up") == []
    assert errors.snapshot()[("sglang", "url_not_allowed")] == len(refused)
    scrape_families(poller, *refused)
    assert errors.snapshot()[("sglang", "url_not_allowed")] == len(refused), "counted once per engine and URL"


def test_allowed_hosts_extend_the_policy():
    policy = UrlPolicy.default(["10.0.0.0/8", "rollout.svc"])
    assert policy.check("http://10.1.2.3:30000") is None
    assert policy.check("http://rollout.svc:30000") is None
    assert policy.check("http://127.0.0.1:30000") is None
    assert policy.check("http://[::1]:30000") is None
    assert "outside" in policy.check("http://192.0.2.1:30000")
    assert "malformed" in policy.check("http://127.0.0.1:notaport")


def test_an_engine_that_goes_away_drops_its_series(fake_sglang):
    server = fake_sglang("new")
    poller = new_poller()
    e = engine("e", server.url)
    assert one(polled(poller, e), "gpu_residency_sglang_up", engine="e") == 1
    m = scrape_families(poller, engine("e", server.url, up=False))
    assert values(m, "gpu_residency_sglang_up") == [] and values(m, "gpu_residency_sglang_memory_bytes") == []


def test_parser_reads_every_known_shape():
    assert parse_server_info(b'{"internal_states": [{"memory_usage": {"kvcache": 1}}]}')[0].components == {
        "kvcache": GIB
    }
    flat = parse_server_info(b'{"memory_usage": {"kvcache": 2, "token_capacity": 5}}')
    assert flat[0].components == {"kvcache": 2 * GIB} and flat[0].token_capacity == 5
    ancient = parse_server_info(json_bytes(server_info("ancient", 1)))
    assert ancient[0].components == {} and ancient[0].token_capacity is None
    bad_values = parse_server_info(
        b'{"internal_states": [{"memory_usage": {"kvcache": -1, "weight": "3", "graph": {"a": 1, "b": null},'
        b' "token_capacity": true}}]}'
    )
    assert bad_values[0].components == {} and bad_values[0].token_capacity is None
    for body in (b"[]", b'{"internal_states": 3}', b'{"internal_states": [1]}'):
        with pytest.raises(ShapeError):
            parse_server_info(body)


def json_bytes(value: object) -> bytes:
    import json

    return json.dumps(value).encode()


def test_exporter_process_polls_a_registered_engine_without_waiting_for_a_scrape(
    exporter_factory, scenario, spawn_tree, fake_sglang, tmp_path
):
    from exporter.registry import register_engine

    server = fake_sglang("new", dp_size=2)
    tree = spawn_tree()
    register_engine("rollout-0", root_pid=tree.pid, url=server.url, directory=tmp_path / "reg")
    exporter = exporter_factory(
        scenario, "--registry.dir", str(tmp_path / "reg"), "--no-engines.discover", "--sglang.poll-interval", "0.2"
    )
    deadline = time.monotonic() + 10
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.requests, "the background poller found the engine before any scrape"
    time.sleep(0.3)
    m = exporter.scrape()
    assert one(m, "gpu_residency_sglang_up", engine="rollout-0") == 1
    assert one(m, "gpu_residency_sglang_memory_bytes", engine="rollout-0", dp_rank="1", component="kvcache") == (
        56.25 * GIB
    )


# ---------- /metrics: newer releases' memory gauges, where /server_info is absent or slow ----------


def accounting(m: dict, name: str) -> dict:
    """(series, dp_rank, component) -> value of every accounting series of the engine `name`."""
    out = {}
    for family in ("gpu_residency_sglang_memory_bytes", "gpu_residency_sglang_token_capacity",
                   "gpu_residency_sglang_startup_available_bytes"):  # fmt: skip
        for labels, value in m.get(family, []):
            if labels["engine"] == name:
                out[(family, labels["dp_rank"], labels.get("component", ""))] = value
    return out


def test_metrics_only_engine_gives_the_same_series_as_server_info(fake_sglang):
    """Two schedulers (TP 2) per DP rank publish the same figures: one is read, nothing is doubled;
    the per-phase graph gauges are summed as /server_info's per-phase dict is."""
    reference, only = fake_sglang("new", dp_size=2), fake_sglang("metrics_only", dp_size=2, tp_size=2)
    poller = new_poller()
    m = polled(poller, engine("ref", reference.url), engine("gauges", only.url))
    expected = accounting(m, "ref")
    assert expected[("gpu_residency_sglang_memory_bytes", "1", "graph")] == 1.25 * GIB
    assert expected[("gpu_residency_sglang_startup_available_bytes", "0", "")] == 70 * GIB
    assert accounting(m, "gauges") == expected and len(expected) == 2 * 5
    assert only.requests == ["/server_info", "/get_server_info", "/metrics"]
    time.sleep(0.25)  # past the poll interval
    polled(poller, engine("gauges", only.url))
    assert only.requests[3:] == ["/metrics"], "remembered: /server_info is not asked again"


def test_a_server_info_that_outlives_the_deadline_is_read_from_metrics_next(fake_sglang):
    slow = fake_sglang("slow_info")
    errors = ErrorCounter()
    poller = new_poller(errors, read_timeout=0.5)
    e = engine("slow", slow.url)
    assert one(polled(poller, e), "gpu_residency_sglang_up", engine="slow") == 0
    assert errors.snapshot()[("sglang", "timeout")] == 1
    time.sleep(0.25)
    m = polled(poller, e)
    assert one(m, "gpu_residency_sglang_up", engine="slow") == 1
    assert one(m, "gpu_residency_sglang_memory_bytes", engine="slow", component="kvcache") == 55.25 * GIB
    assert slow.requests[-1] == "/metrics"


def test_metrics_parser_on_every_shape_and_what_it_refuses():
    assert parse_metrics(metrics("mid", 1, 1)) is None, "an older release: no memory gauges"
    (rank,) = parse_metrics(metrics("new", 1, 4))
    assert rank.components == {"weight": 14.5 * GIB, "kvcache": 55.25 * GIB, "graph": 1.25 * GIB}
    assert (rank.token_capacity, rank.startup_available) == (901_234, 70 * GIB)
    assert parse_metrics(metrics("new", 2, 1)) == tuple(parse_server_info(json.dumps(server_info("new", 2))))
    lines = [
        'sglang:weight_memory_usage_gb{tp_rank="1"} 9.0',
        'sglang:weight_memory_usage_gb{tp_rank="0"} NaN',  # the scheduler read: not a figure, no series
        'sglang:kv_cache_memory_usage_gb{tp_rank="0"} 2.0',
        'sglang:graph_memory_usage_gb{tp_rank="0",phase="decode"} 0.5',
        'sglang:graph_memory_usage_gb{tp_rank="0",phase="decode",pid="7"} 0.5',  # a copy: which is current?
    ]
    (rank,) = parse_metrics("\n".join(lines) + "\n")
    assert rank.components == {"kvcache": 2.0 * GIB}
    with pytest.raises(ShapeError):
        parse_metrics('sglang:weight_memory_usage_gb{dp_rank="x"} 1.0\n')
    with pytest.raises(ValueError):
        parse_metrics(b"<html>\x00{")


def test_a_catalog_resolution_is_how_a_poller_learns_its_engines(fake_sglang, spawn_tree, tmp_path):
    """Issue 26: a poller never wakes to ask for engines. With none it sleeps with no timeout; the next
    resolution of the catalog (any collection: a scrape or the watcher's, at a registry change) names
    the engine, and the poller polls it at once, with no scrape asking for its results."""
    from exporter.cli import build_parser
    from exporter.engines.catalog import EngineCatalog
    from exporter.pollers.flags import build_pollers
    from exporter.registry import register_engine
    from exporter.sources.proctable import ProcView

    server, tree, registry = fake_sglang("new"), spawn_tree(), tmp_path / "reg"
    catalog = EngineCatalog(ErrorCounter(), registry_dir=registry, discover=False)
    sglang, vllm = build_pollers(build_parser().parse_args([]), ErrorCounter(), catalog)
    sglang.start()
    try:
        assert sglang._until_due() is None, "no engine: no wake-up at all"
        register_engine("heard", root_pid=tree.pid, url=server.url, directory=registry)
        catalog.resolve(ProcView())
        deadline = time.monotonic() + 20
        while (sglang.last("heard") is None or not sglang.last("heard").ok) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sglang.last("heard") is not None and sglang.last("heard").ok
        assert server.requests[0] == "/server_info"
        assert vllm.last("heard") is None, "not a vLLM engine"
    finally:
        sglang.stop()
