"""Engine sources: registry entries, SGLang discovery, static config, PID namespaces, containers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, kill_with_descendants, one, require_root_tools, scrape_until, values

from exporter.engines.catalog import EngineCatalog
from exporter.engines.discovery import parse_launch
from exporter.engines.static import ConfigError, load_static_config
from exporter.errors import ErrorCounter
from exporter.registry import EngineEntry, RegistryError, register_engine, registered_engine
from exporter.sources.proctable import ProcView, parse_container, parse_nspid, parse_stat
from fakenvml import GIB


def test_register_engine_writes_a_complete_atomic_entry(tmp_path):
    path = register_engine("rollout-1", root_pid=os.getpid(), url="http://127.0.0.1:30001", directory=tmp_path)
    entry = EngineEntry.from_json(path.read_text())
    assert entry.name == "rollout-1" and entry.root_pid == os.getpid()
    assert entry.pid_ns == os.stat("/proc/self/ns/pid").st_ino
    assert entry.start_ticks == ProcView().info(os.getpid()).start_ticks
    assert [p.name for p in tmp_path.iterdir()] == ["rollout-1.json"], "no temporary files left behind"


def test_registered_engine_context_unregisters_even_on_error(tmp_path):
    with pytest.raises(RuntimeError), registered_engine("ctx", directory=tmp_path):
        assert (tmp_path / "ctx.json").exists()
        raise RuntimeError("engine failed")
    assert not (tmp_path / "ctx.json").exists()


@pytest.mark.parametrize(
    "body, message",
    [
        ("{", "not JSON"),
        ("[]", "JSON object"),
        ('{"name": "x"}', "root_pid"),
        ('{"name": "../etc", "root_pid": 5}', "must match"),
        ('{"name": "x", "root_pid": -3}', "positive integer"),
        ('{"name": "x", "root_pid": 5, "kind": "nope"}', "kind"),
        ('{"name": "x", "root_pid": true}', "positive integer"),
    ],
)
def test_invalid_entries_are_refused_with_a_reason(body, message):
    with pytest.raises(RegistryError, match=message):
        EngineEntry.from_json(body)


def test_bad_registry_files_are_counted_and_skipped(local_exporter, scenario, spawn_tree, tmp_path):
    tree = spawn_tree()
    registry = local_exporter.registry_dir
    register_engine("good", root_pid=tree.pid, directory=registry)
    (registry / "broken.json").write_text('{"name": "broken", "root_pi')
    (registry / "huge.json").write_text(" " * (70 * 1024))
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"name": "evil", "root_pid": tree.pid}))
    (registry / "evil.json").symlink_to(outside)

    m = local_exporter.scrape()

    assert one(m, "gpu_residency_engine_up", engine="good") == 1
    assert values(m, "gpu_residency_engine_up", engine="evil") == []
    assert values(m, "gpu_residency_engine_up", engine="broken") == []
    for reason in ("malformed", "too_large", "refused"):
        assert one(m, "gpu_residency_errors_total", source="registry", reason=reason) == 1
    # Unchanged bad files are not re-read and re-counted on every scrape.
    m = local_exporter.scrape()
    assert one(m, "gpu_residency_errors_total", source="registry", reason="malformed") == 1


PY = "/opt/venv/bin/python3"  # a console script runs as <interpreter> <script> ..., its comm the script's name


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["python3", "-m", "sglang.launch_server", "--model-path", "m", "--port", "30001"],
         ("sglang", "127.0.0.1", 30001)),
        (["python", "-m", "sglang.launch_server", "--host=0.0.0.0", "--port=31000"], ("sglang", "127.0.0.1", 31000)),
        (["python", "-m", "sglang.launch_server", "--host", "10.1.2.3"], ("sglang", "10.1.2.3", 30000)),
        (["/usr/bin/sglang", "serve", "--port", "30002"], ("sglang", "127.0.0.1", 30002)),
        ([PY, "/opt/venv/bin/sglang", "serve", "--model-path", "m"], ("sglang", "127.0.0.1", 30000)),
        (["python", "-m", "sglang.launch_server", "--port", "99999"], None),
        # vLLM: `vllm serve <model>` binds every interface on port 8000 unless told otherwise.
        ([PY, "/opt/venv/bin/vllm", "serve", "Qwen/Qwen3-8B"], ("vllm", "127.0.0.1", 8000)),
        (["vllm", "serve", "Qwen/Qwen3-8B", "--port", "8011", "--enable-sleep-mode"], ("vllm", "127.0.0.1", 8011)),
        ([PY, "/opt/venv/bin/vllm", "serve", "m", "--host", "10.0.0.7", "--port=9000"], ("vllm", "10.0.0.7", 9000)),
        (["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "m", "--host", "0.0.0.0"],
         ("vllm", "127.0.0.1", 8000)),
        ([PY, "/opt/venv/bin/vllm", "serve", "m", "--uds", "/tmp/v.sock"], ("vllm", None, None)),
        ([PY, "/opt/venv/bin/vllm", "bench", "serve", "--port", "8000"], None),  # a client, not a server
        (["VLLM::EngineCore"], None),  # its children are titled, never launches
        (["python", "train.py", "--port", "30000"], None),
        ([], None),
    ],
)  # fmt: skip
def test_launch_command_lines(argv, expected):
    launch = parse_launch(argv)
    assert (launch and (launch.kind, launch.host, launch.port)) == expected


def test_discovers_an_sglang_launch_and_its_tree(fake_nvml_dir, scenario, monkeypatch, tmp_path):
    from exporter.collectors.assembly import ResidencyCollector
    from exporter.sources.nvml import NvmlSource
    from fakenvml import SONAME

    # A real process whose command line is an SGLang launch, with a child holding GPU memory.
    code = "import subprocess,sys,time; c=subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); "
    code += "print(c.pid, flush=True); time.sleep(60)"
    launch = subprocess.Popen(
        [sys.executable, "-c", code, "-m", "sglang.launch_server", "--port", "31234"], stdout=subprocess.PIPE, text=True
    )
    child_fd = None
    try:
        child = int(launch.stdout.readline())
        child_fd = os.pidfd_open(child)  # the child is killed too, never a later process with its PID
        monkeypatch.setenv("FAKE_NVML_SCENARIO", str(scenario.path))
        scenario.gpus[0].processes = [(child, 2 * GIB)]
        scenario.gpus[0].used = 2 * GIB
        scenario.write()
        errors = ErrorCounter()
        catalog = EngineCatalog(errors, registry_dir=tmp_path / "none", discover=True)
        catalog.scan()
        collector = ResidencyCollector("n", NvmlSource(errors, str(fake_nvml_dir / SONAME)), catalog, errors)
        snapshot, _ = collector.snapshot()
        name = f"sglang-31234-{launch.pid}"
        engine = next(e for e in snapshot.engines if e.name == name)
        assert engine.url == "http://127.0.0.1:31234" and engine.source == "discovered" and engine.up
        assert engine.url_problem is None, "in the exporter's own network namespace: polled"
        assert [(u.engine, u.used_bytes) for u in snapshot.engine_usage] == [(name, 2 * GIB)]

        # Registered under its own name, the same process is not discovered a second time.
        register_engine("rollout-x", root_pid=launch.pid, directory=tmp_path / "reg")
        catalog = EngineCatalog(errors, registry_dir=tmp_path / "reg", discover=True)
        catalog.scan()
        names = [e.name for e in catalog.resolve(ProcView())]
        assert "rollout-x" in names and name not in names
    finally:
        launch.kill()
        launch.wait()
        if child_fd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(child_fd, signal.SIGKILL)
            os.close(child_fd)


def test_static_config_finds_an_engine_by_pid_file(tmp_path, spawn_tree):
    tree = spawn_tree()
    pid_file = tmp_path / "engine.pid"
    pid_file.write_text(f"{tree.pid}\n")
    config = tmp_path / "engines.toml"
    config.write_text(
        f'[[engines]]\nname = "fixed"\nurl = "http://127.0.0.1:30000"\npid_file = "{pid_file}"\n'
        '[[engines]]\nname = "gone"\nkind = "trainer"\nroot_pid = 999999999\n'
    )
    catalog = EngineCatalog(ErrorCounter(), registry_dir=None, static=load_static_config(str(config)), discover=False)
    engines = {e.name: e for e in catalog.resolve(ProcView())}
    assert engines["fixed"].up and engines["fixed"].root_pid == tree.pid
    assert not engines["gone"].up and engines["gone"].kind == "trainer"


@pytest.mark.parametrize(
    "body, message",
    [
        ("engines = 3", "engines"),
        ("[[engines]]\nname='a'\nroot_pid=1\nextra=1", "unknown keys"),
        ("[[engines]]\nname='a'\nroot_pid=1\n[[engines]]\nname='a'\nroot_pid=2", "duplicate"),
        ("[[engines]]\nname='bad name'\nroot_pid=1", "must match"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_static_config_errors_name_the_problem(tmp_path, body, message):
    config = tmp_path / "engines.toml"
    config.write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_static_config(str(config))


def test_stat_parsing_survives_hostile_comm():
    text = "42 (evil) name) (x) S 7 42 42 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 1 0 123456 0 0"
    info = parse_stat(42, text)
    assert info.comm == "evil) name) (x" and info.ppid == 7 and info.start_ticks == 123456
    assert parse_stat(1, "garbage") is None


def test_nspid_and_container_parsing():
    assert parse_nspid("Name:\tx\nNSpid:\t4121\t7\t1\n") == (4121, 7, 1)
    assert parse_nspid("Name:\tx\n") == ()
    cid = "a" * 64
    assert parse_container(f"0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-{cid}.scope\n") == cid
    assert parse_container(f"12:memory:/docker/{cid}\n") == cid
    assert parse_container(f"0::/system.slice/docker-{cid}.scope\n") == cid
    assert parse_container("0::/user.slice/user-0.slice/session-1.scope\n") == ""


def test_entry_from_another_pid_namespace_is_resolved_through_nspid(tmp_path):
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and util-linux unshare to create a PID namespace")
    registry = tmp_path / "reg"
    code = (
        "import time; from exporter.registry import register_engine; "
        f"register_engine('in-ns', directory={str(registry)!r}); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [unshare, "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not (registry / "in-ns.json").exists() and time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.skip(f"cannot create a PID namespace here: {proc.stderr.read().decode()[:200]}")
            time.sleep(0.05)
        entry = EngineEntry.from_json((registry / "in-ns.json").read_text())
        assert entry.root_pid == 1 and entry.pid_ns != os.stat("/proc/self/ns/pid").st_ino
        catalog = EngineCatalog(ErrorCounter(), registry_dir=registry, discover=False)
        (engine,) = catalog.resolve(ProcView())
        assert not engine.up, "the first look misses: the NSpid lookup is a process-table scan, left to the scanner"
        catalog.scan()
        (engine,) = catalog.resolve(ProcView())
        assert engine.up and engine.root_pid not in (1, proc.pid), "the container's own PID 1, proven by NSpid"
        assert parse_nspid(Path(f"/proc/{engine.root_pid}/status").read_text())[-1] == 1
    finally:
        kill_with_descendants(proc)  # the namespace's init too: killing unshare alone leaves it running


def test_a_second_file_claiming_a_name_is_refused_and_the_engine_keeps_its_tree(local_exporter, scenario, spawn_tree,
                                                                                tmp_path):  # fmt: skip
    """In a shared registry anyone may add a file: `zz-other.json` saying `"name": "x"` beside x.json
    took engine x over (its root, its memory). An entry counts only in the file named after it."""
    ours, theirs = spawn_tree(), spawn_tree()
    registry = local_exporter.registry_dir
    register_engine("x", root_pid=ours.pid, url="http://127.0.0.1:30000", directory=registry)
    claim = register_engine("x", root_pid=theirs.pid, url="http://127.0.0.1:30999", directory=tmp_path / "elsewhere")
    claim.rename(registry / "zz-other.json")
    scenario.gpus[0].processes = [(ours.leaves[0], 10 * GIB), (theirs.leaves[0], 5 * GIB)]
    scenario.gpus[0].used = 15 * GIB
    scenario.write()
    for _ in range(2):  # counted once, not at every scrape
        m = local_exporter.scrape()
        assert one(m, "gpu_residency_engine_memory_bytes", engine="x", gpu=0) == 10 * GIB
        by_pid = {labels["pid"]: labels["engine"] for labels, _ in m["gpu_residency_process_memory_bytes"]}
        assert by_pid == {str(ours.leaves[0]): "x", str(theirs.leaves[0]): ""}
        assert one(m, "gpu_residency_errors_total", source="registry", reason="name_mismatch") == 1
    (registry / "x.json").unlink()
    m = local_exporter.scrape()
    assert values(m, "gpu_residency_engine_up", engine="x") == [], "alone, the misnamed file is still refused"


LAUNCH = "import time; time.sleep(60)"  # a process whose command line is an SGLang launch; it serves nothing


def _launch(port: int, *prefix: str) -> subprocess.Popen:
    """Started, and past any `prefix` (unshare) that execs the interpreter in the end."""
    proc = subprocess.Popen([*prefix, sys.executable, "-c", LAUNCH, "-m", "sglang.launch_server", "--port", str(port)])
    deadline = time.monotonic() + 20
    while (
        os.readlink(f"/proc/{proc.pid}/exe") != os.path.realpath(sys.executable)
        or "sglang.launch_server" not in Path(f"/proc/{proc.pid}/cmdline").read_text()
    ):
        assert time.monotonic() < deadline and proc.poll() is None, "the launch did not start"
        time.sleep(0.02)
    return proc


def test_discovered_engines_on_one_port_stay_distinct(tmp_path):
    """Two launches on one port, one in a network namespace of its own, and a third after the first
    ended (a restart reusing the port): three engines, three names; only ours is polled."""
    unshare, _ = require_root_tools()
    first, other_net = _launch(31555), _launch(31555, unshare, "--net")
    try:
        catalog = EngineCatalog(ErrorCounter(), registry_dir=None, discover=True)
        deadline = time.monotonic() + 20
        while not {first.pid, other_net.pid} <= set(engines := {e.root_pid: e for e in catalog.resolve(ProcView())}):
            assert time.monotonic() < deadline, "discovery missed a launch"
            catalog.scan()
        assert engines[first.pid].name == f"sglang-31555-{first.pid}" and engines[first.pid].url_problem is None
        assert engines[other_net.pid].name == f"sglang-31555-{other_net.pid}"
        assert "another network namespace" in engines[other_net.pid].url_problem
        first.kill()
        first.wait()
        restarted = _launch(31555)
        try:
            catalog.scan()
            names = {e.name for e in catalog.resolve(ProcView()) if e.name.startswith("sglang-31555-")}  # not others
            assert names == {f"sglang-31555-{restarted.pid}", f"sglang-31555-{other_net.pid}"}
        finally:
            restarted.kill()
            restarted.wait()
    finally:
        for proc in (first, other_net):
            proc.kill()
            proc.wait()


def test_a_discovered_engine_in_another_network_namespace_is_measured_not_polled(exporter_factory, scenario, tmp_path):
    unshare, _ = require_root_tools()
    ours, other_net = _launch(31556), _launch(31556, unshare, "--net")
    try:
        scenario.gpus[0].processes = [(ours.pid, 2 * GIB), (other_net.pid, 3 * GIB)]
        scenario.gpus[0].used = 5 * GIB
        scenario.write()
        exporter = exporter_factory(scenario, "--registry.dir", str(tmp_path / "none"),
                                    "--engines.discovery-interval", "0.2", "--sglang.poll-interval", "0.2")  # fmt: skip
        here, there = f"sglang-31556-{ours.pid}", f"sglang-31556-{other_net.pid}"
        m = scrape_until(exporter, lambda m: values(m, "gpu_residency_sglang_up", engine=here) == [0])
        m = scrape_until(
            exporter, lambda m: values(m, "gpu_residency_errors_total", source="sglang", reason="url_unreachable")
        )
        assert one(m, "gpu_residency_engine_memory_bytes", engine=there, gpu=0) == 3 * GIB, "measured"
        assert values(m, "gpu_residency_sglang_up", engine=there) == [], "never polled: its loopback is not ours"
        assert one(m, "gpu_residency_engine_memory_bytes", engine=here, gpu=0) == 2 * GIB
    finally:
        for proc in (ours, other_net):
            proc.kill()
            proc.wait()
