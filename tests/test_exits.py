"""Engine exits: clear messages, durable events, counters that survive exporter restarts."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, one, values

from exporter.exits import (
    EVENTS_FILE,
    EngineExitedError,
    describe_exit,
    report_exit,
    wait_server_healthy,
)
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
