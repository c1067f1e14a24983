"""Crash forensics on real processes: the kernel OOM-kills for real in a memory cgroup here, a child
dies before its launcher, an outside SIGKILL, a plain exit, a death nobody reports. Each exit must
carry the cause the evidence supports, never a guess, and the GPU peak before it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT, one, scrape_until, values

from exporter.engines.catalog import Engine
from exporter.errors import ErrorCounter
from exporter.exits import ExitEvent, describe_exit, report_exit, wait_server_healthy
from exporter.exits.causes import Death, Member, determine_cause, zombie_exitcode
from exporter.exits.forensics import Forensics
from exporter.registry import register_engine
from exporter.sources.oom_evidence import memory_counter_files, read_oom_kills
from exporter.sources.proctable import read_proc
from fakenvml import GIB, SONAME

# A launcher (the engine's root) and one titled child, as SGLang's launch_server and its scheduler.
# The child, once `go` exists: "oom" allocates until killed, "fail" exits 1, "exit0" exits 0 (a helper
# that finished); "sleep" just waits. The launcher waits for its child without reaping it (as
# multiprocessing leaves a child until it is joined), so the child's status stays readable, then
# SIGKILLs itself after `delay` seconds (SGLang kills its tree). Each process ends by itself after
# LIFETIME seconds whatever happens to the test.
LIFETIME = 90.0
ENGINE = r"""
import os, signal, subprocess, sys, time
go, child_mode, delay, lifetime = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + lifetime
if child_mode == "exit3":
    print(os.getpid(), flush=True)
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(3)
child = subprocess.Popen([sys.executable, "-c", '''
import os, sys, time, setproctitle
setproctitle.setproctitle("sglang::scheduler_TP0")
go, mode, deadline = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.05)
if mode == "oom":
    hold = []
    for _ in range(64):
        hold.append(bytearray(16 * 1024 * 1024))
if mode == "fail":
    sys.exit(1)
if mode == "exit0":
    sys.exit(0)
time.sleep(max(0.0, deadline - time.monotonic()))
''', go, child_mode, str(lifetime)])
print(child.pid, flush=True)
while time.monotonic() < deadline and not os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
    time.sleep(0.05)
time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
os.kill(os.getpid(), signal.SIGKILL)
"""


class FakeEngine:
    def __init__(self, tmp_path: Path, name: str, child_mode: str, delay: float = 0.0, cgroup: Path | None = None):
        self.go = tmp_path / f"{name}.go"
        join = (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))) if cgroup else None
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ENGINE, str(self.go), child_mode, str(delay), str(LIFETIME),
             "--secret-arg", "SECRET-ARGV-7"],
            stdout=subprocess.PIPE, text=True, preexec_fn=join, env=dict(os.environ, HF_TOKEN="SECRET-ENV-8"),
        )  # fmt: skip
        try:
            self.child = int(self.proc.stdout.readline())
        except ValueError:  # it failed to start: nothing of it may outlive the test
            self.proc.kill()
            self.proc.wait()
            raise
        # A descriptor for the child itself: the fixture kills that process, never a later one with its PID.
        self.child_fd = os.pidfd_open(self.child) if self.child != self.proc.pid else None
        self.name = name

    def start_failing(self) -> None:
        self.go.write_text("go")

    def child_ended(self) -> bool:
        """The child is a zombie or gone (its own parent decides when it is reaped)."""
        try:
            stat = Path(f"/proc/{self.child}/stat").read_text()
        except OSError:
            return True
        return stat[stat.rfind(")") + 2] in "ZX"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.child_fd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.child_fd, signal.SIGKILL)
            os.close(self.child_fd)


@pytest.fixture
def engines():
    """The tests' fake engines, launchers and children both, stopped however the test ends."""
    started: list[FakeEngine] = []
    try:
        yield started
    finally:
        for engine in started:
            engine.stop()


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `condition` until it holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met in {timeout}s"
        time.sleep(0.05)


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
        # The quick deaths reported first: each report must beat the 1 s grace period of its own death.
        for engine in (plain, outside, oom, child):
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
        assert "exited with status 1" in record["detail"], "the status read from the child's zombie"
        assert "sglang::scheduler_TP0" in record["detail"] and record["gpus"][0]["gpu"] == 1
        assert exits_of(exporter, "outside")["cause"] == "unknown", "a SIGKILL alone names no cause"
        assert exits_of(exporter, "plain")["cause"] == "exit_code"
        silent_record = exits_of(exporter, "silent")
        assert silent_record["cause"] == "unknown" and silent_record["exitcode"] is None

        m = exporter.scrape()
        for engine, code, sig, cause in (
            ("oom", "-9", "SIGKILL", "oom_kill"),
            ("child", "-9", "SIGKILL", "child_failure"),
            ("outside", "-9", "SIGKILL", "unknown"),
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


def test_a_death_is_heard_within_a_second_with_every_tick_a_minute_long(exporter_factory, scenario, engines, tmp_path):
    """Issue 26: deaths come from events, not ticks. Every timed look is set to 60 s; an engine registered
    after start-up is watched at once (inotify on the registry), its child's failure and its root's death are
    heard at once (pidfds), and the reported exit is counted with its cause and the GPU peak before the
    death within a second, with no scrape asking (/api/v1/exits only reads what was counted)."""
    registry = tmp_path / "reg"
    registry.mkdir()
    exporter = exporter_factory(scenario, "--registry.dir", str(registry), "--no-engines.discover",
                                "--forensics.interval", "60", "--forensics.tree-interval", "60",
                                "--engines.state-interval", "60", "--exits.grace-period", "60")  # fmt: skip
    engine = FakeEngine(tmp_path, "heard", "fail")
    engines.append(engine)
    scenario.gpus[1].processes = [(engine.child, 30 * GIB)]
    scenario.gpus[1].used = 31 * GIB
    scenario.write()
    before = one(exporter.scrape(), "gpu_residency_forensics_history_collections")
    register_engine("heard", root_pid=engine.proc.pid, directory=registry)
    # Heard: the registration alone makes the exporter collect (this scrape's own collection aside).
    scrape_until(exporter, lambda m: one(m, "gpu_residency_forensics_history_collections") >= before + 2)
    engine.start_failing()
    code = engine.proc.wait(timeout=30)
    died = time.monotonic()
    report_exit("heard", code, directory=registry)
    record, deadline = None, died + 10
    while record is None and time.monotonic() < deadline:
        found = requests.get(exporter.url + "/api/v1/exits", params={"engine": "heard"}, timeout=10).json()["exits"]
        record, took = (found[0] if found else None), time.monotonic() - died
        time.sleep(0.02)
    assert record is not None, exporter.log()[-3000:]
    assert took < 1.0, f"the exit was counted {took:.2f}s after the death"
    assert record["cause"] == "child_failure" and record["victim_pid"] == engine.child, record
    assert [(g["gpu"], g["used_bytes"]) for g in record["gpus"]] == [(1, 31 * GIB)], "the GPU state before the death"


def test_an_oom_kill_is_told_by_the_memory_cgroup_alone(exporter_factory, scenario, engines, tmp_path, child_cgroup):
    """As deployed the kernel log is unreadable (no CAP_SYSLOG): the cgroup's oom_kill counter still tells."""
    registry = tmp_path / "reg"
    oom = FakeEngine(tmp_path, "oom", "oom", cgroup=child_cgroup("forensics-only-cgroup", limit_bytes=64 * 1024**2))
    engines.append(oom)
    register_engine("oom", root_pid=oom.proc.pid, directory=registry)
    exporter = exporter_factory(scenario, "--registry.dir", str(registry), "--forensics.kmsg", "",
                                "--forensics.interval", "0.2")  # fmt: skip
    # Both the launcher and its child are watched (the child's death is what the counter is read at).
    scrape_until(exporter, lambda m: values(m, "gpu_residency_forensics_watched_processes", engine="oom") == [2])
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
    assert "The exporter found: child_failure: a process of its tree failed first" in message
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


FAILED, KILLED = 1 << 8, 9  # wait statuses as a zombie shows them: exited 1, killed by SIGKILL


@pytest.mark.parametrize(
    "code, death, cause",
    [
        (None, None, "unknown"),
        (-9, None, "unknown"),
        (137, None, "unknown"),
        (-15, None, "unknown"),
        (1, None, "exit_code"),
        (0, None, "exit_code"),
        # the root and a child gone at the same look: no order, so no child failure
        (-9, _death([Member(10, 1, "python3", 100.0), Member(11, 2, "sglang::scheduler_TP0", 100.0, 1)]), "unknown"),
        (None, _death([Member(10, 1, "python3", 100.0), Member(11, 2, "x", 100.5, 1)]), "unknown"),
        (-9, _death([Member(10, 1, "python3", 100.0), Member(11, 2, "sglang::scheduler", 98.0, 1)]), "child_failure"),
        (-9, _death([Member(10, 1, "python3", 100.0), Member(11, 2, "s", 98.0, -11)]), "child_failure"),
        # a child that exited 0, or whose status nobody could read, failed at nothing
        (-15, _death([Member(10, 1, "python3", 100.0), Member(11, 2, "helper", 92.0, None)]), "unknown"),
        # a failure longer ago than the child window is no cause of this death
        (-15, _death([Member(10, 1, "python3", 100.0), Member(11, 2, "helper", 80.0, 1)]), "unknown"),
        # an OOM kill counted long before the tree died is not its evidence
        (-9, _death([Member(10, 1, "python3", 100.0)], oom=[(50.0, "/x/memory.events.local")]), "unknown"),
        (-9, _death([Member(10, 1, "python3", 100.0), Member(11, 2, "s", 99.5)], oom=[(99.5, "/x/oom_control")]),
         "oom_kill"),
    ],
)  # fmt: skip
def test_causes_come_from_evidence_never_from_a_guess(code, death, cause):
    assert determine_cause(code, death).cause == cause


def test_a_zombie_status_of_zero_proves_nothing():
    """The kernel shows a zombie's status only to a reader that may trace it, 0 to others."""
    assert [zombie_exitcode(status) for status in (0, FAILED, KILLED, 2 << 8)] == [None, 1, -9, 2]


def test_a_kernel_log_line_naming_a_tree_process_is_an_oom_kill():
    death = _death([Member(10, 1, "python3", 100.0), Member(11, 2, "sglang::scheduler_TP0", 99.8, -9)])
    evidence = determine_cause(-9, death, [(99.9, 11, "python3"), (99.9, 999, "other")])
    assert (
        evidence.cause == "oom_kill" and evidence.victim_pid == 11 and evidence.victim_title == "sglang::scheduler_TP0"
    )
    assert determine_cause(-9, death, [(99.9, 999, "other")]).cause == "child_failure"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_oom_counters_are_the_groups_own_never_an_ancestors(tmp_path, version):
    """Fixture trees shaped like /sys/fs/cgroup on cgroup v1 (memory controller) and v2 (unified): the
    kubepods.slice above a container counts every pod's kills, so only the container's own counter is read."""
    uid = "pod15513b48_e7a5_48fc_b9e3_92f713f36504"
    path = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{uid}.slice/cri-containerd-abc.scope"
    if version == "v1":
        base, own, line = tmp_path / "memory", "memory.oom_control", f"4:memory:/{path}"
        body = "oom_kill_disable 0\nunder_oom 0\noom_kill {n}\n"
    else:
        (tmp_path / "cgroup.controllers").write_text("memory\n")
        base, own, line = tmp_path, "memory.events.local", f"0::/../../{path}"  # seen from another cgroup namespace
        body = "low 0\nhigh 0\nmax 3\noom 1\noom_kill {n}\noom_group_kill 0\n"
    leaf = base / path
    leaf.mkdir(parents=True)
    for directory in (leaf, *leaf.relative_to(base).parents):
        for name in {own, "memory.events"} if version == "v2" else {own}:
            (base / directory / name).write_text(body.format(n=5))
    (leaf / own).write_text(body.format(n=2))
    assert memory_counter_files(line + "\n", tmp_path) == [leaf / own]
    assert read_oom_kills(leaf / own) == 2
    # A group that is not there is nobody's: no parent's or root's counter in its place.
    assert memory_counter_files(line.replace("abc.scope", "gone.scope") + "\n", tmp_path) == []


V2_EVENTS = "low 0\nhigh 0\nmax 0\noom {n}\noom_kill {n}\noom_group_kill 0\n"


def test_another_pods_oom_kill_in_a_cgroup_v2_parent_is_no_evidence(tmp_path, engines):
    """A cgroup v2 hierarchy laid out in a temp dir, real engine processes: the unified line of their
    /proc/<pid>/cgroup here is `0::/`, the laid-out root. Its hierarchical memory.events counts a kill in
    another pod below it; its memory.events.local (the group's own) does not. A SIGTERM after that is
    no OOM kill; a kill counted in the group's own counter is."""
    (tmp_path / "cgroup.controllers").write_text("memory\n")
    events, local = tmp_path / "memory.events", tmp_path / "memory.events.local"
    events.write_text(V2_EVENTS.format(n=0))
    local.write_text(V2_EVENTS.format(n=0))
    forensics = Forensics("n", ErrorCounter(), cgroup_root=tmp_path, kmsg=None, tree_interval=0.0)

    def death_of(engine: FakeEngine, code: int):
        root = Engine(engine.name, "sglang", None, "registry", engine.proc.pid, read_proc(engine.proc.pid).start_ticks,
                      True)  # fmt: skip
        forensics.tick([root])
        assert forensics.watching(engine.name)
        yield
        engine.proc.send_signal(signal.SIGTERM if code == -15 else signal.SIGKILL)
        assert engine.proc.wait(timeout=30) == code
        forensics.tick([dataclasses.replace(root, up=False)])
        event = ExitEvent("id-" + engine.name, engine.name, code, time.time(), root_pid=engine.proc.pid)
        yield forensics.explain(event, forensics.death_for(event))

    stopped = FakeEngine(tmp_path, "stopped", "sleep")
    engines.append(stopped)
    steps = death_of(stopped, -15)
    next(steps)
    events.write_text(V2_EVENTS.format(n=1))  # another pod, under the same parent, was OOM-killed
    assert next(steps).cause == "unknown"

    killed = FakeEngine(tmp_path, "killed", "sleep")
    engines.append(killed)
    steps = death_of(killed, -9)
    next(steps)
    local.write_text(V2_EVENTS.format(n=1))
    events.write_text(V2_EVENTS.format(n=2))
    evidence = next(steps)
    assert evidence.cause == "oom_kill" and "memory.events.local" in evidence.facts[0], evidence


def _watched_root(forensics: Forensics, engine: FakeEngine) -> Engine:
    root = Engine(engine.name, "sglang", None, "registry", engine.proc.pid, read_proc(engine.proc.pid).start_ticks,
                  True)  # fmt: skip
    forensics.tick([root])
    assert forensics.watching(engine.name)
    return root


def test_a_root_the_catalog_saw_dead_before_its_death_was_handled_keeps_its_death(tmp_path, engines):
    """The watcher's collection can read the catalog after the root died but before its pidfd was
    handled: the death is heard first, not dropped with the watch (seen as cause `unknown` under load)."""
    forensics = Forensics("n", ErrorCounter(), kmsg=None)
    engine = FakeEngine(tmp_path, "raced", "sleep", delay=LIFETIME)
    engines.append(engine)
    root = _watched_root(forensics, engine)
    engine.proc.kill()
    engine.proc.wait()
    assert forensics.sync([dataclasses.replace(root, up=False)]) is False  # nothing handled before it
    death = forensics.death_for(ExitEvent("id", "raced", -9, time.time(), root_pid=engine.proc.pid))
    assert death is not None and death.root_pid == engine.proc.pid


def test_a_tree_pass_does_not_re_base_away_the_oom_kill_of_a_death_not_yet_handled(tmp_path, engines):
    """The cgroup counter rises as the kernel kills a child; a tree pass that re-reads the counters
    before that child's pidfd is handled must hear the death first, or the rise is lost (cgroup v2
    laid out in a temp dir as above; the kill is a real SIGKILL of the real child)."""
    (tmp_path / "cgroup.controllers").write_text("memory\n")
    local = tmp_path / "memory.events.local"
    local.write_text(V2_EVENTS.format(n=0))
    forensics = Forensics("n", ErrorCounter(), cgroup_root=tmp_path, kmsg=None)
    engine = FakeEngine(tmp_path, "swallowed", "sleep", delay=LIFETIME)
    engines.append(engine)
    root = _watched_root(forensics, engine)
    local.write_text(V2_EVENTS.format(n=1))
    os.kill(engine.child, signal.SIGKILL)
    wait_for(engine.child_ended, what="the child's death")
    forensics.look(force=True)  # a tree pass comes first
    engine.proc.kill()
    engine.proc.wait()
    forensics.tick([dataclasses.replace(root, up=False)])
    event = ExitEvent("id", "swallowed", -9, time.time(), root_pid=engine.proc.pid)
    evidence = forensics.explain(event, forensics.death_for(event))
    assert evidence.cause == "oom_kill" and evidence.victim_pid == engine.child, evidence


def test_a_reading_taken_before_its_engine_was_watched_still_gives_the_gpu_state_at_its_death(
    tmp_path, engines, scenario, fake_nvml_dir, monkeypatch
):
    """The collection that finds a new engine reads the GPUs before the engine is watched; recorded
    again once it is (same time: no second reading), it is the state at a death that comes before any
    other reading, with the child already reaped."""
    from exporter.sources.nvml import NvmlSource

    monkeypatch.setenv("FAKE_NVML_SCENARIO", str(scenario.path))
    engine = FakeEngine(tmp_path, "early", "fail")
    engines.append(engine)
    scenario.gpus[1].processes = [(engine.child, 7 * GIB)]
    scenario.gpus[1].used = 8 * GIB
    scenario.write()
    forensics = Forensics("n", ErrorCounter(), kmsg=None)
    reading, at = NvmlSource(ErrorCounter(), str(fake_nvml_dir / SONAME)).read(), time.time()
    forensics.record(reading, at)
    root = Engine("early", "sglang", None, "registry", engine.proc.pid, read_proc(engine.proc.pid).start_ticks, True)
    assert forensics.sync([root]) is True, "a new engine is watched"
    forensics.record(reading, at)
    kept = {family.name: family.samples for family in forensics.families()}
    assert kept["gpu_residency_forensics_history_collections"][0].value == 1, "the same reading, not a second one"
    engine.start_failing()
    engine.proc.wait(timeout=30)
    forensics.tick([dataclasses.replace(root, up=False)])
    death = forensics.death_for(ExitEvent("id", "early", -9, time.time(), root_pid=engine.proc.pid))
    assert [(gpu.gpu, gpu.used_bytes) for gpu in death.gpus] == [(1, 8 * GIB)]


def test_dead_members_leave_the_tree_after_the_child_window(tmp_path, engines):
    """A long-lived engine runs helpers; each one's death is kept only as long as it can be a cause."""
    forensics = Forensics("n", ErrorCounter(), kmsg=None, tree_interval=0.0, child_window=0.5)
    engine = FakeEngine(tmp_path, "long-lived", "fail", delay=LIFETIME)
    engines.append(engine)
    root = Engine("long-lived", "sglang", None, "registry", engine.proc.pid, read_proc(engine.proc.pid).start_ticks,
                  True)  # fmt: skip
    forensics.tick([root])
    engine.start_failing()
    wait_for(engine.child_ended, what="the child's exit")
    forensics.tick([root])  # seen gone, with its status
    seen_gone = time.monotonic()
    wait_for(lambda: time.monotonic() - seen_gone > 1.0, what="the child window passing")
    forensics.tick([root])  # let go
    engine.proc.kill()
    engine.proc.wait()
    forensics.tick([dataclasses.replace(root, up=False)])
    death = forensics.death_for(ExitEvent("id", "long-lived", -9, time.time(), root_pid=engine.proc.pid))
    assert [member.pid for member in death.members] == [engine.proc.pid], "the helper left the tree"


def test_a_helper_that_finished_is_no_cause_of_a_later_stop(exporter_factory, scenario, engines, tmp_path):
    """The issue's case: a registered engine's helper exits 0; seconds later (within the child window,
    5 s here, 10 s by default) an operator stops the engine with SIGTERM. And a child that failed
    longer ago than the window is no cause either. Both are SIGTERMs with no evidence: unknown."""
    registry = tmp_path / "reg"
    helper = FakeEngine(tmp_path, "helper", "exit0", delay=LIFETIME)
    stale = FakeEngine(tmp_path, "stale", "fail", delay=LIFETIME)
    engines += [helper, stale]
    for engine in engines:
        register_engine(engine.name, root_pid=engine.proc.pid, directory=registry)
    # Both children hold GPU memory, so each collection makes them members of their engine's tree.
    scenario.gpus[0].processes = [(helper.child, GIB), (stale.child, GIB)]
    scenario.gpus[0].used = 2 * GIB
    scenario.write()
    exporter = exporter_factory(scenario, "--registry.dir", str(registry), "--forensics.interval", "0.2",
                                "--forensics.child-window", "5")  # fmt: skip

    def collections_after(count: int) -> None:
        """Wait until the forensics history holds `count` more collections (each after a look)."""
        start = one(exporter.scrape(), "gpu_residency_forensics_history_collections")
        scrape_until(exporter, lambda m: one(m, "gpu_residency_forensics_history_collections") >= start + count)

    scrape_until(exporter, lambda m: values(m, "gpu_residency_engine_memory_bytes", engine="stale") == [GIB])
    collections_after(2)  # the trees are watched, both children in them
    stale.start_failing()
    wait_for(stale.child_ended, what="the stale child's exit")
    failed_at = time.monotonic()
    wait_for(lambda: time.monotonic() - failed_at > 4.0, what="most of the window")
    helper.start_failing()
    wait_for(helper.child_ended, what="the helper's exit")
    collections_after(1)  # the exporter looked after the helper's death: a look before the root's
    wait_for(lambda: time.monotonic() - failed_at > 6.5, what="the stale failure leaving the window")
    for engine in (helper, stale):
        engine.proc.send_signal(signal.SIGTERM)
        report_exit(engine.name, engine.proc.wait(timeout=30), directory=registry)
    for engine in (helper, stale):
        record = exits_of(exporter, engine.name)
        assert record["cause"] == "unknown" and record["exitcode"] == -15, record
    m = exporter.scrape()
    assert one(m, "gpu_residency_engine_exits_total", engine="helper", signal="SIGTERM", cause="unknown") == 1
    assert values(m, "gpu_residency_engine_exits_total", cause="child_failure") == []


def test_describe_exit_says_what_the_evidence_says():
    record = {"cause": "oom_kill", "detail": "kernel OOM killer killed pid 11 (sglang::scheduler_TP0)"}
    text = describe_exit(-9, 3.0, "http://h:1", evidence=record)
    assert text.endswith("The exporter found: oom_kill: kernel OOM killer killed pid 11 (sglang::scheduler_TP0)")
    assert "OOM killer (host or cgroup memory), SGLang" in describe_exit(-9, 3.0, "http://h:1"), "no evidence: options"


def test_the_history_tick_reads_only_the_live_engines_gpus(tmp_path, scenario, fake_nvml_dir, spawn_tree, monkeypatch):
    """Between scrapes the GPU history needs the engines' GPUs alone (issue 26): used memory and process
    lists of those, no other GPU; with no engine watched, nothing at all."""
    from exporter.engines.catalog import EngineCatalog
    from exporter.sources.nvml import NvmlSource
    from exporter.sources.proctable import ProcView

    monkeypatch.setenv("FAKE_NVML_SCENARIO", str(scenario.path))
    tree, registry = spawn_tree(), tmp_path / "reg"
    scenario.gpus[1].processes = [(tree.leaves[0], 5 * GIB)]
    scenario.gpus[1].used = 6 * GIB
    scenario.write()
    nvml = NvmlSource(ErrorCounter(), str(fake_nvml_dir / SONAME))
    forensics = Forensics("n", ErrorCounter(), kmsg=None)
    assert forensics.wanted_gpus() == set(), "no engine watched: no read"
    register_engine("e", root_pid=tree.pid, directory=registry)
    forensics.sync(EngineCatalog(ErrorCounter(), registry, discover=False).resolve(ProcView()))
    assert forensics.wanted_gpus() is None, "nothing read yet: every GPU once"
    forensics.record(nvml.read())
    assert forensics.wanted_gpus() == {1}
    reading = nvml.read(forensics.wanted_gpus())
    assert [(gpu.index, gpu.used_bytes) for gpu in reading.gpus] == [(1, 6 * GIB)] and reading.complete


def test_a_tick_that_finds_the_used_memory_unchanged_keeps_the_last_reading_standing():
    """Issue 26: the history tick reads only used memory; when no GPU changed to the byte it reads no
    process lists and the last reading stands until then, so a death long after it (beyond the window)
    still has its GPU state. Any change, or a GPU that cannot say, wants a whole reading."""
    from exporter.exits.history import GpuHistory
    from exporter.sources.nvml import GpuProcess, GpuReading, NvmlReading

    def reading(used: int) -> NvmlReading:
        gpu = GpuReading(1, "GPU-1", "0:1", "fake", used, 80 * GIB, 0, (GpuProcess(42, used),))
        return NvmlReading(True, (gpu,))

    history, owner = GpuHistory(window=60.0), lambda pid: ("e", "sglang::scheduler_TP0")
    history.record(reading(8 * GIB), owner, at=1000.0)
    assert history.peaks("e", 1200.0) == [], "not confirmed: it stood until 1000 only"
    assert not history.confirm({1: 9 * GIB}, 1100.0) and not history.confirm({1: None}, 1100.0)
    assert not history.confirm({2: 8 * GIB}, 1100.0), "a GPU the last reading did not have"
    assert history.confirm({1: 8 * GIB}, 1190.0)
    (peak,) = history.peaks("e", 1200.0)
    assert (peak.gpu, peak.used_bytes, peak.at) == (1, 8 * GIB, 1190.0), "seen last when confirmed"
    assert [h.name for h in peak.top_holders] == ["e"]
    history.record(reading(4 * GIB), owner, at=1195.0)  # released: the peak is still the 8 GiB before
    assert [(p.used_bytes, p.at) for p in history.peaks("e", 1200.0)] == [(8 * GIB, 1190.0)]
    # Of equal peaks, the one where the engine's processes were known as its: a reading taken once it
    # died (its scheduler a plain process then) does not hide it.
    orphaned = GpuHistory(window=60.0)
    orphaned.record(reading(8 * GIB), owner, at=1000.0)
    orphaned.record(reading(8 * GIB), lambda pid: ("", "sglang::scheduler_TP0"), at=1001.0)
    (peak,) = orphaned.peaks("e", 1001.5)
    assert ([h.kind for h in peak.top_holders], peak.at) == (["engine"], 1000.0)


def test_the_history_tick_runs_on_the_nvml_thread_and_reads_process_lists_only_on_change(
    tmp_path, scenario, fake_nvml_dir, spawn_tree, monkeypatch
):
    """Issue 26: between scrapes the GPU history is kept by the NVML thread alone (the watcher thread
    sleeps): the engines' GPUs' used memory each tick, a new reading only when it changed."""
    import fakenvml
    from exporter.cli import build_parser
    from exporter.runtime import build_exporter

    monkeypatch.setenv("FAKE_NVML_SCENARIO", str(scenario.path))
    tree, registry = spawn_tree(), tmp_path / "reg"
    scenario.gpus[1].processes = [(tree.leaves[0], 5 * GIB)]
    scenario.gpus[1].used = 6 * GIB
    scenario.write()
    register_engine("e", root_pid=tree.pid, directory=registry)
    args = build_parser().parse_args(["--node", "n", "--registry.dir", str(registry), "--no-engines.discover",
                                      "--state.dir", "", "--forensics.interval", "0.1", "--forensics.kmsg", "",
                                      "--nvml.library", str(fake_nvml_dir / fakenvml.SONAME)])  # fmt: skip
    exporter = build_exporter(args, ErrorCounter())
    monkeypatch.setattr("exporter.watcher.FULL_READ_EVERY", 10**6)  # no whole read now and then here
    calls, used = {"used": 0}, exporter.nvml.used

    def counted(only: set[int]) -> dict | None:
        calls["used"] += 1
        return used(only)

    monkeypatch.setattr(exporter.nvml, "used", counted)

    def kept() -> int:
        return next(f for f in exporter.forensics.families() if f.name.endswith("history_collections")).samples[0].value

    exporter.start()
    try:
        wait_for(lambda: exporter.forensics.watching("e") and calls["used"] >= 3, what="ticks on a watched engine")
        readings, steps, ticks = kept(), exporter.watcher.steps, calls["used"]
        wait_for(lambda: calls["used"] >= ticks + 5, what="five more ticks")
        assert kept() == readings, "nothing changed: no new reading (no process lists read)"
        scenario.gpus[1].used = 7 * GIB
        scenario.write()
        wait_for(lambda: kept() > readings, what="a reading once the used memory changed")
        assert exporter.watcher.steps == steps, "the watcher thread slept through every tick"
    finally:
        exporter.stop()
