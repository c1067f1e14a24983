"""Engine exits: clear messages, durable events, counters that survive exporter restarts."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, build_local, one, values

from exporter.exits import EngineExitedError, describe_exit, report_exit, wait_server_healthy
from exporter.exits.counts import MAX_SERIES, ExitCounts
from exporter.exits.event_tail import Position
from exporter.exits.events import EVENTS_FILE, MAX_EVENT_BYTES, EventTooLarge, ExitEvent
from exporter.exits.report import append_event
from exporter.exits.state import STATE_FILE, SavedState, StateTooLarge, decode_state, encode_state
from exporter.registry import register_engine
from fakenvml.sglang import FakeSglang

CASES = [
    # child code, expected exit_code label, signal label, message fragment, launch's own exit status
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "-9", "SIGKILL", "SGLang's launcher killing", 137),
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "-11", "SIGSEGV", "crash in native code", 139),
    ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", "-15", "SIGTERM", "asked to stop", 143),
    ("import sys; sys.exit(3)", "3", "", "exited with status 3", 3),
    ("pass", "0", "", None, 0),
]


def launch(registry, engine: str, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "exporter", "launch", "--engine", engine, "--url", "http://127.0.0.1:30000",
         "--registry.dir", str(registry), "--", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False,
    )  # fmt: skip


def test_real_exits_through_launch_are_counted_with_the_right_labels(exporter_factory, scenario, tmp_path):
    registry = tmp_path / "registry"
    for index, (code, _, _, fragment, status) in enumerate(CASES):
        result = launch(registry, f"engine-{index}", code)
        assert result.returncode == status, result.stderr
        if fragment:
            assert fragment in result.stderr and f"engine engine-{index}" in result.stderr
        else:
            assert result.stderr == ""
    assert not list(registry.glob("engine-*.json")), "launch unregisters its engine"

    exporter = exporter_factory(scenario, "--registry.dir", str(registry), "--no-engines.discover")
    m = exporter.scrape()
    for index, (_, exit_code, signal_label, _, _) in enumerate(CASES):
        assert one(m, "gpu_residency_engine_exits_total", engine=f"engine-{index}") == 1
        assert one(m, "gpu_residency_engine_exits_total", engine=f"engine-{index}", exit_code=exit_code,
                   signal=signal_label) == 1  # fmt: skip


def test_launch_forwards_sigterm_and_records_it(tmp_path):
    registry = tmp_path / "registry"
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "launch", "--engine", "fwd", "--registry.dir", str(registry), "--",
         sys.executable, "-c", "import time; time.sleep(60)"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not (registry / "fwd.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert '"exitcode":-15' in (registry / EVENTS_FILE).read_text()


def test_launch_without_a_command_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "launch", "--engine", "x", "--registry.dir", str(tmp_path)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "no command given" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "code, expected",
    [
        (-9, "terminated during start-up: exitcode=-9 (killed by SIGKILL), elapsed=41.2s, url=http://h:1; "
             "killed by SIGKILL: the kernel OOM killer (host or cgroup memory), SGLang's launcher killing its tree "
             "after a scheduler failed, or an outside kill (operator, Ray); when the exporter runs"),
        (-11, "exitcode=-11 (killed by SIGSEGV)"),
        (3, "exitcode=3 (exited with status 3)"),
        (137, "exitcode=137 (128+9: killed by SIGKILL, as a shell reports it), elapsed"),
        (137, "; killed by SIGKILL: the kernel OOM killer"),
        (0, "exitcode=0 (exited normally)"),
        (None, "exitcode=None (no exit status"),
    ],
)  # fmt: skip
def test_describe_exit(code, expected):
    text = describe_exit(code, 41.23, "http://h:1")
    assert expected in text
    assert "likely an OOM" not in text, "SIGKILL is not only the OOM killer: SGLang's launcher kills its tree with it"


def _report_many(name: str, registry) -> None:
    for _ in range(100):
        report_exit(name, -9, directory=registry)


def test_two_reporters_at_once_lose_nothing(tmp_path, local_exporter):
    registry = local_exporter.registry_dir
    threads = [threading.Thread(target=_report_many, args=(name, registry)) for name in ("a", "b")]
    spawn = multiprocessing.get_context("spawn")
    processes = [spawn.Process(target=_report_many, args=(name, registry)) for name in ("c", "d")]
    for worker in (*threads, *processes):
        worker.start()
    for worker in (*threads, *processes):
        worker.join(timeout=60)
    m = local_exporter.scrape()
    for name in "abcd":
        assert one(m, "gpu_residency_engine_exits_total", engine=name, exit_code="-9", signal="SIGKILL") == 100
    assert values(m, "gpu_residency_errors_total", source="events") == []


def test_restart_between_events_loses_nothing_and_counts_nothing_twice(exporter_factory, scenario, tmp_path):
    registry = tmp_path / "registry"
    report_exit("e", -9, directory=registry)
    first = exporter_factory(scenario, "--registry.dir", str(registry), "--no-engines.discover")
    assert one(first.scrape(), "gpu_residency_engine_exits_total", engine="e") == 1
    report_exit("e", 3, directory=registry)
    assert one(first.scrape(), "gpu_residency_engine_exits_total", engine="e", exit_code="3") == 1
    first.stop()

    report_exit("e", -9, directory=registry)  # while the exporter is down
    second = exporter_factory(scenario, "--registry.dir", str(registry), "--no-engines.discover")
    m = second.scrape()
    assert one(m, "gpu_residency_engine_exits_total", engine="e", exit_code="-9") == 2
    assert one(m, "gpu_residency_engine_exits_total", engine="e", exit_code="3") == 1
    m = second.scrape()
    assert one(m, "gpu_residency_engine_exits_total", engine="e", exit_code="-9") == 2


def test_torn_and_duplicate_lines_are_handled(local_exporter):
    registry = local_exporter.registry_dir
    event = report_exit("t", 1, directory=registry)
    events = registry / EVENTS_FILE
    with events.open("a") as handle:
        handle.write(event.to_json() + "\n")  # the same event again (a retried write)
        handle.write('{"id": "half", "engine": "t", "exitc')  # a writer still mid-line
    m = local_exporter.scrape()
    assert one(m, "gpu_residency_engine_exits_total", engine="t") == 1
    with events.open("a") as handle:
        handle.write('ode": 2, "time": 1.0}\n')
    m = local_exporter.scrape()
    assert one(m, "gpu_residency_engine_exits_total", engine="t", exit_code="2") == 1
    with events.open("a") as handle:
        handle.write("not json\n")
    assert one(local_exporter.scrape(), "gpu_residency_errors_total", source="events", reason="malformed") == 1


def test_an_unreported_death_counts_once_as_unknown(exporter_factory, scenario, spawn_tree, tmp_path):
    registry = tmp_path / "registry"
    tree = spawn_tree()
    register_engine("silent", root_pid=tree.pid, directory=registry)
    reported = spawn_tree()
    register_engine("reported", root_pid=reported.pid, directory=registry)
    exporter = exporter_factory(
        scenario, "--registry.dir", str(registry), "--no-engines.discover", "--exits.grace-period", "0.5"
    )
    assert one(exporter.scrape(), "gpu_residency_engine_up", engine="silent") == 1
    for victim in (tree, reported):
        victim.root.kill()
        victim.root.wait()
    report_exit("reported", -9, directory=registry)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        m = exporter.scrape()
        if values(m, "gpu_residency_engine_exits_total", engine="silent"):
            break
        time.sleep(0.2)
    assert one(m, "gpu_residency_engine_exits_total", engine="silent", exit_code="unknown", signal="") == 1
    assert values(m, "gpu_residency_engine_exits_total", engine="reported", exit_code="unknown") == []
    time.sleep(1)
    m = exporter.scrape()
    assert one(m, "gpu_residency_engine_exits_total", engine="silent") == 1
    exporter.stop()
    again = exporter_factory(scenario, "--registry.dir", str(registry), "--exits.grace-period", "0.5")
    again.scrape()
    time.sleep(1)
    assert one(again.scrape(), "gpu_residency_engine_exits_total", engine="silent") == 1, "not again after restart"


def test_wait_server_healthy_raises_at_once_when_the_engine_dies(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import os, time, signal; time.sleep(0.5); os.kill(os.getpid(), 9)"])
    started = time.monotonic()
    with pytest.raises(EngineExitedError) as caught:
        wait_server_healthy("http://127.0.0.1:9", proc, timeout=60, engine="dying", directory=tmp_path)
    assert time.monotonic() - started < 10
    assert caught.value.exitcode == -9
    text = str(caught.value)
    assert text.startswith("Server process terminated unexpectedly during health_generate check. exitcode=-9, ")
    assert "url=http://127.0.0.1:9 (killed by SIGKILL)" in text
    assert '"engine":"dying"' in (tmp_path / EVENTS_FILE).read_text()


def test_wait_server_healthy_returns_when_healthy_and_times_out_otherwise():
    server = FakeSglang("new", lifetime=30)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert wait_server_healthy(server.url, sleeper, timeout=10) < 10
        with pytest.raises(TimeoutError, match="not healthy after"):
            wait_server_healthy("http://127.0.0.1:9", sleeper, timeout=1, poll_interval=0.1)
    finally:
        server.stop()
        sleeper.kill()
        sleeper.wait()


def _die_with_sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_wait_server_healthy_understands_multiprocessing(tmp_path):
    proc = multiprocessing.get_context("spawn").Process(target=_die_with_sigkill)
    proc.start()
    with pytest.raises(EngineExitedError, match="killed by SIGKILL"):
        wait_server_healthy("http://127.0.0.1:9", proc, timeout=60)
    proc.join()


# ---------- the events files are shared input: each line stands alone, the state stays bounded ----------


def _line(**fields) -> str:
    event = {"id": os.urandom(8).hex(), "engine": "x", "exitcode": -9, "time": time.time(), **fields}
    return json.dumps(event) + "\n"


@pytest.mark.parametrize(
    "bad",
    [
        {"root_pid": [1, 2]},  # the case: a list where a number belongs
        {"root_pid": -4},
        {"start_ticks": "12"},
        {"exitcode": True},
        {"exitcode": 10**30},
        {"time": "yesterday"},
        {"time": 10**400},
        {"elapsed": {"s": 1}},
        {"url": ["http://x"]},
        {"url": "http://x/" + "a" * 2000},
        {"engine": "two words"},  # not a registry name, so never a label
        {"engine": "x" * 200},
        {"id": 7},
    ],
)
def test_a_malformed_event_costs_itself_never_the_lines_after_it(local_exporter, bad):
    events = local_exporter.registry_dir / EVENTS_FILE
    events.parent.mkdir(parents=True, exist_ok=True)
    events.write_text(_line(exitcode=3) + _line(**bad) + _line(exitcode=-9))
    m = local_exporter.scrape()
    assert one(m, "gpu_residency_engine_exits_total", engine="x", exit_code="3") == 1
    assert one(m, "gpu_residency_engine_exits_total", engine="x", exit_code="-9", signal="SIGKILL") == 1
    assert one(m, "gpu_residency_errors_total", source="events", reason="malformed") == 1
    m = local_exporter.scrape()
    assert values(m, "gpu_residency_engine_exits_total", engine="x") == [1, 1], "each counted once"


def test_the_reader_keeps_the_writers_size_limit(local_exporter):
    """The writer refuses an event over MAX_EVENT_BYTES; so does the reader, whoever wrote the line."""
    registry = local_exporter.registry_dir
    with pytest.raises(EventTooLarge):
        append_event(ExitEvent("big", "x", -9, time.time(), url="a" * MAX_EVENT_BYTES), registry)
    events = registry / EVENTS_FILE
    events.write_text(_line(pad="a" * MAX_EVENT_BYTES) + _line(exitcode=-9))
    m = local_exporter.scrape()
    assert one(m, "gpu_residency_errors_total", source="events", reason="too_large") == 1
    assert one(m, "gpu_residency_engine_exits_total", engine="x", exit_code="-9") == 1


def test_huge_events_never_outgrow_the_state_and_a_restart_keeps_every_count(local_exporter, tmp_path, fake_nvml_dir):
    """The issue's case: six 3 MiB event lines made the state file outgrow its own 16 MiB limit, and
    the next start threw every count away. They are refused now; the state stays small."""
    registry = local_exporter.registry_dir
    report_exit("kept", -9, directory=registry)
    with (registry / EVENTS_FILE).open("a") as handle:
        for _ in range(6):
            handle.write(_line(url="http://x/" + "a" * 3 * 1024 * 1024))
    report_exit("kept", 3, directory=registry)
    counted = scrape_until_local(
        local_exporter, lambda m: values(m, "gpu_residency_errors_total", source="events", reason="too_large") == [6]
    )
    assert one(counted, "gpu_residency_engine_exits_total", engine="kept", exit_code="3") == 1
    state = tmp_path / "state" / STATE_FILE
    assert state.stat().st_size < 64 * 1024
    again = build_local(registry, tmp_path / "state", fake_nvml_dir)
    m = again.scrape()
    for code in ("-9", "3"):
        assert one(m, "gpu_residency_engine_exits_total", engine="kept", exit_code=code) == 1
    assert values(m, "gpu_residency_errors_total", source="exits_state") == []


def scrape_until_local(exporter, ready, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while not ready(m := exporter.scrape()):
        assert time.monotonic() < deadline, "condition not met"
    return m


def test_the_state_file_never_outgrows_its_limit():
    """Counts, positions and pending exits always fit; the oldest ids and recent records give way."""
    counts = {(f"e{i}", "-9", "SIGKILL", "unknown"): (i + 1, 1.0) for i in range(50)}
    positions = [Position(7, 100, b"head")]
    pending = [ExitEvent("p", "e1", -9, 1.0)]
    recent = [{"id": str(i), "detail": "d" * 200} for i in range(100)]
    state = SavedState(counts, positions, pending, [str(i) for i in range(100)], recent)
    text = encode_state(state, limit=12_000)
    assert len(text) <= 12_000
    back = decode_state(json.loads(text))
    assert back.counts == counts and back.positions == positions and back.pending == pending
    assert 0 < len(back.recent) < 100 and back.recent[-1] == recent[-1], "the newest records kept"
    assert back.ids and back.ids[-1] == "99"
    with pytest.raises(StateTooLarge):
        encode_state(state, limit=2_000)


def test_exit_series_are_capped():
    counts = ExitCounts(first_zero_seconds=0)
    for index in range(MAX_SERIES):
        assert counts.add((f"e{index}", "1", "", "exit_code"), 1.0, new_at_zero=False)
    assert counts.add(("e0", "1", "", "exit_code"), 2.0, new_at_zero=False), "an existing series still counts"
    assert not counts.add(("one-more", "1", "", "exit_code"), 2.0, new_at_zero=False)
    assert len(counts.published()) == MAX_SERIES
