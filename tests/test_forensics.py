"""Crash forensics on real processes: the kernel OOM-kills for real in a memory cgroup here, a child
dies before its launcher, an outside SIGKILL, a plain exit, a death nobody reports. Each exit must
carry the cause the evidence supports, never a guess, and the GPU peak before it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT, one, values

from exporter.exits import describe_exit, report_exit, wait_server_healthy
from exporter.forensics import Death, Member, determine_cause, memory_counter_files, read_oom_kills
from exporter.registry import register_engine
from fakenvml import GIB

# A launcher (the engine's root) and one titled child, as SGLang's launch_server and its scheduler.
# The child, once `go` exists: "oom" allocates until killed, "fail" exits 1; "sleep" just waits.
# The launcher, when its child dies, SIGKILLs itself after `delay` seconds (SGLang kills its tree).
ENGINE = r"""
import os, signal, subprocess, sys, time
go, child_mode, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
if child_mode == "exit3":
    print(os.getpid(), flush=True)
    while not os.path.exists(go):
        time.sleep(0.05)
    sys.exit(3)
child = subprocess.Popen([sys.executable, "-c", '''
import os, sys, time, setproctitle
setproctitle.setproctitle("sglang::scheduler_TP0")
go, mode = sys.argv[1], sys.argv[2]
while not os.path.exists(go):
    time.sleep(0.05)
if mode == "oom":
    hold = []
    for _ in range(64):
        hold.append(bytearray(16 * 1024 * 1024))
    time.sleep(60)
if mode == "fail":
    sys.exit(1)
time.sleep(120)
''', go, child_mode])
print(child.pid, flush=True)
while child.poll() is None:
    time.sleep(0.05)
time.sleep(delay)
os.kill(os.getpid(), signal.SIGKILL)
"""


class FakeEngine:
    def __init__(self, tmp_path: Path, name: str, child_mode: str, delay: float = 0.0, cgroup: Path | None = None):
        self.go = tmp_path / f"{name}.go"
        join = (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))) if cgroup else None
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ENGINE, str(self.go), child_mode, str(delay), "--secret-arg", "SECRET-ARGV-7"],
            stdout=subprocess.PIPE, text=True, preexec_fn=join, env=dict(os.environ, HF_TOKEN="SECRET-ENV-8"),
        )  # fmt: skip
        self.child = int(self.proc.stdout.readline())
        self.name = name

    def start_failing(self) -> None:
        self.go.write_text("go")


@pytest.fixture
def engines():
    started: list[FakeEngine] = []
    yield started
    for engine in started:
        engine.proc.kill()
        engine.proc.wait()


def exits_of(exporter, engine: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = requests.get(exporter.url + "/api/v1/exits", params={"engine": engine}, timeout=10).json()["exits"]
        if records:
            return records[0]
        time.sleep(0.2)
    raise AssertionError(f"no exit recorded for {engine}:\n{exporter.log()[-3000:]}")


def test_every_cause_from_evidence_on_real_processes(exporter_factory, scenario, engines, tmp_path, child_cgroup):
    registry = tmp_path / "reg"
    pod = child_cgroup("forensics-pod", limit_bytes=64 * 1024 * 1024)
    oom = FakeEngine(tmp_path, "oom", "oom", cgroup=pod)
    child = FakeEngine(tmp_path, "child", "fail", delay=1.0)
    outside = FakeEngine(tmp_path, "outside", "sleep")
    plain = FakeEngine(tmp_path, "plain", "exit3")
    silent = FakeEngine(tmp_path, "silent", "sleep")
    engines += [oom, child, outside, plain, silent]
    for engine in engines:
        register_engine(engine.name, root_pid=engine.proc.pid, directory=registry)
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        # GPU 0 nearly full just before the OOM engine dies: its scheduler and a trainer.
        scenario.gpus[0].processes = [(oom.child, 70 * GIB), (trainer.pid, 8 * GIB)]
        scenario.gpus[0].used = 78 * GIB + GIB // 2
        scenario.gpus[1].processes = [(child.child, 20 * GIB)]
        scenario.gpus[1].used = 20 * GIB
        scenario.write()
        exporter = exporter_factory(scenario, "--registry.dir", str(registry), "--exits.grace-period", "1",
                                    "--forensics.interval", "0.2")  # fmt: skip
        deadline = time.monotonic() + 15
        while values(exporter.scrape(), "gpu_residency_engine_memory_bytes", engine="oom") != [70 * GIB]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.5)  # a few collections in the history, the trees watched

        for engine in (oom, child, plain):
            engine.start_failing()
        outside.proc.send_signal(signal.SIGKILL)
        silent.proc.send_signal(signal.SIGKILL)  # nobody will report this one
        for engine in (oom, child, outside, plain):
            report_exit(engine.name, engine.proc.wait(timeout=30), directory=registry)

        record = exits_of(exporter, "oom")
        assert record["cause"] == "oom_kill" and record["exitcode"] == -9, record
        assert record["victim_pid"] == oom.child and record["victim_title"] == "sglang::scheduler_TP0"
        (gpu,) = record["gpus"]
        assert gpu["gpu"] == 0 and gpu["used_bytes"] == 78 * GIB + GIB // 2 and gpu["total_bytes"] == 80 * GIB
        top = [(h["kind"], h["name"], h["used_bytes"]) for h in gpu["top_holders"]]
        assert top[0] == ("engine", "oom", 70 * GIB) and top[1][2] == 8 * GIB, top

        record = exits_of(exporter, "child")
        assert record["cause"] == "child_failure" and record["victim_pid"] == child.child, record
        assert "sglang::scheduler_TP0" in record["detail"] and record["gpus"][0]["gpu"] == 1
        assert exits_of(exporter, "outside")["cause"] == "signal"
        assert exits_of(exporter, "plain")["cause"] == "exit_code"
        silent_record = exits_of(exporter, "silent")
        assert silent_record["cause"] == "unknown" and silent_record["exitcode"] is None

        m = exporter.scrape()
        for engine, code, sig, cause in (
            ("oom", "-9", "SIGKILL", "oom_kill"),
            ("child", "-9", "SIGKILL", "child_failure"),
            ("outside", "-9", "SIGKILL", "signal"),
            ("plain", "3", "", "exit_code"),
            ("silent", "unknown", "", "unknown"),
        ):
            assert one(m, "gpu_residency_engine_exits_total", engine=engine, exit_code=code, signal=sig,
                       cause=cause) == 1  # fmt: skip
        assert one(m, "gpu_residency_forensics_evidence_available", source="memory_cgroup") == 1
        assert 1 <= one(m, "gpu_residency_forensics_history_collections") <= 240

        body = requests.get(exporter.url + "/api/v1/exits", timeout=10).text
        assert "SECRET-ARGV-7" not in body and "SECRET-ENV-8" not in body and "--secret-arg" not in body
        names = [r["engine"] for r in json.loads(body)["exits"]]
        assert len(names) == 5 and set(names) == {"oom", "child", "outside", "plain", "silent"}

        command = [sys.executable, "-m", "exporter", "exits", "--url", exporter.url]
        environ = dict(os.environ, PYTHONPATH=str(ROOT))
        shown = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environ, check=False)
        assert shown.returncode == 0, shown.stderr
        assert "cause=oom_kill" in shown.stdout and "GPU 0: peak 78.5 of 80.0 GiB used" in shown.stdout
        times = [line.split("  ")[0] for line in shown.stdout.splitlines() if line[:2] == "20"]
        assert times == sorted(times, reverse=True), "newest first"
    finally:
        trainer.kill()
        trainer.wait()


def test_an_oom_kill_is_told_by_the_memory_cgroup_alone(exporter_factory, scenario, engines, tmp_path, child_cgroup):
    """As deployed the kernel log is unreadable (no CAP_SYSLOG): the cgroup's oom_kill counter still tells."""
    registry = tmp_path / "reg"
    oom = FakeEngine(tmp_path, "oom", "oom", cgroup=child_cgroup("forensics-only-cgroup", limit_bytes=64 * 1024**2))
    engines.append(oom)
    register_engine("oom", root_pid=oom.proc.pid, directory=registry)
    exporter = exporter_factory(scenario, "--registry.dir", str(registry), "--forensics.kmsg", "",
                                "--forensics.interval", "0.2")  # fmt: skip
    deadline = time.monotonic() + 15
    while not values(exporter.scrape(), "gpu_residency_engine_up", engine="oom"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.0)
    oom.start_failing()
    report_exit("oom", oom.proc.wait(timeout=30), directory=registry)
    record = exits_of(exporter, "oom")
    assert record["cause"] == "oom_kill" and str(oom.child) in record["detail"], record
    assert any("memory.oom_control" in fact for fact in record["facts"])
    assert one(exporter.scrape(), "gpu_residency_forensics_evidence_available", source="kernel_log") == 0


def test_the_start_up_wait_says_what_the_exporter_found(exporter_factory, scenario, engines, tmp_path):
    registry = tmp_path / "reg"
    child = FakeEngine(tmp_path, "starting", "fail", delay=1.0)
    engines.append(child)
    register_engine("starting", root_pid=child.proc.pid, directory=registry)
    exporter = exporter_factory(scenario, "--registry.dir", str(registry), "--forensics.interval", "0.2")
    time.sleep(1.5)  # the exporter watches the tree
    child.start_failing()
    with pytest.raises(RuntimeError) as caught:
        wait_server_healthy("http://127.0.0.1:9", process=child.proc, engine="starting", directory=registry,
                            exporter_url=exporter.url, poll_interval=0.1)  # fmt: skip
    message = str(caught.value)
    assert message.startswith("Server process terminated unexpectedly during health_generate check.")
    assert "The exporter found: child_failure: a process of its tree died first" in message
    assert "sglang::scheduler_TP0" in message


# ---------- the rules, on fixtures ----------


def _death(members: list[Member], at: float = 100.0, oom: list[tuple[float, str]] = ()) -> Death:
    return Death("e", 10, 1, at, members, [], list(oom))


def test_a_late_report_of_an_unreported_death_is_the_same_exit(local_exporter, spawn_tree, tmp_path, fake_nvml_dir):
    from conftest import build_local

    registry = local_exporter.registry_dir
    tree = spawn_tree()
    register_engine("late", root_pid=tree.pid, directory=registry)
    tree.root.kill()
    code = tree.root.wait()
    exporter = build_local(registry, tmp_path / "state", fake_nvml_dir, "--exits.grace-period", "0.01")
    exporter.scrape()
    time.sleep(0.05)
    assert one(exporter.scrape(), "gpu_residency_engine_exits_total", engine="late", exit_code="unknown") == 1
    report_exit("late", code, directory=registry)  # the parent's report comes after the grace period
    m = exporter.scrape()
    assert values(m, "gpu_residency_engine_exits_total", engine="late") == [1], "one death, counted once"


@pytest.mark.parametrize(
    "code, death, cause",
    [
        (None, None, "unknown"),
        (-9, None, "signal"),
        (137, None, "signal"),
        (1, None, "exit_code"),
        (0, None, "exit_code"),
        # the root and a child gone at the same look: no order, so no child failure
        (-9, _death([Member(10, 1, "python3", 100.0), Member(11, 2, "sglang::scheduler_TP0", 100.0)]), "signal"),
        (None, _death([Member(10, 1, "python3", 100.0), Member(11, 2, "x", 100.5)]), "unknown"),
        (-9, _death([Member(10, 1, "python3", 100.0), Member(11, 2, "sglang::scheduler_TP0", 98.0)]), "child_failure"),
        # an OOM kill counted long before the tree died is not its evidence
        (-9, _death([Member(10, 1, "python3", 100.0)], oom=[(50.0, "/x/memory.events")]), "signal"),
        (-9, _death([Member(10, 1, "python3", 100.0), Member(11, 2, "s", 99.5)], oom=[(99.5, "/x/memory.events")]),
         "oom_kill"),
    ],
)  # fmt: skip
def test_causes_come_from_evidence_never_from_a_guess(code, death, cause):
    assert determine_cause(code, death).cause == cause


def test_a_kernel_log_line_naming_a_tree_process_is_an_oom_kill():
    death = _death([Member(10, 1, "python3", 100.0), Member(11, 2, "sglang::scheduler_TP0", 99.8)])
    evidence = determine_cause(-9, death, [(99.9, 11, "python3"), (99.9, 999, "other")])
    assert (
        evidence.cause == "oom_kill" and evidence.victim_pid == 11 and evidence.victim_title == "sglang::scheduler_TP0"
    )
    assert determine_cause(-9, death, [(99.9, 999, "other")]).cause == "child_failure"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_oom_counters_of_both_cgroup_versions_and_relative_paths(tmp_path, version):
    """Fixture trees shaped like /sys/fs/cgroup on cgroup v1 (memory controller) and v2 (unified)."""
    uid = "pod15513b48_e7a5_48fc_b9e3_92f713f36504"
    path = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{uid}.slice/cri-containerd-abc.scope"
    if version == "v1":
        base, name, line = tmp_path / "memory", "memory.oom_control", f"4:memory:/{path}"
        body = "oom_kill_disable 0\nunder_oom 0\noom_kill {n}\n"
    else:
        (tmp_path / "cgroup.controllers").write_text("memory\n")
        base, name, line = tmp_path, "memory.events", f"0::/../../{path}"  # seen from another cgroup namespace
        body = "low 0\nhigh 0\nmax 3\noom 1\noom_kill {n}\noom_group_kill 0\n"
    leaf = base / path
    leaf.mkdir(parents=True)
    (leaf / name).write_text(body.format(n=2))
    (leaf.parent / name).write_text(body.format(n=5))
    files = memory_counter_files(line + "\n", tmp_path)
    assert files == [leaf / name, leaf.parent / name]
    assert [read_oom_kills(f) for f in files] == [2, 5]


def test_describe_exit_says_what_the_evidence_says():
    record = {"cause": "oom_kill", "detail": "kernel OOM killer killed pid 11 (sglang::scheduler_TP0)"}
    text = describe_exit(-9, 3.0, "http://h:1", evidence=record)
    assert text.endswith("The exporter found: oom_kill: kernel OOM killer killed pid 11 (sglang::scheduler_TP0)")
    assert "OOM killer (host or cgroup memory), SGLang" in describe_exit(-9, 3.0, "http://h:1"), "no evidence: options"
