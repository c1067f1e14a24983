"""The drop-in helpers keep the contracts of the RLix and miles code they replace.

Expected values are the behaviours recorded from that code (RLix PR #11's residual probe,
wait and env parser; miles' _wait_server_healthy on main and in PR #572; rlops/miles'
gpu_probe), run here on real inputs: a fake nvidia-smi first on PATH, the fake NVML, real
process trees, a fake SGLang on loopback in a real engine process, real SIGKILLs.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT

import fakenvml
import fakenvml.sglang
from fakenvml import NOT_SUPPORTED
from fakenvml.interpreter import shebang_python
from fakenvml.sglang import FakeSglang
from gate import GateConfigError, GateTimeout, ResidualGate
from gate.compat import parse_env_positive_float, probe_max_used_gpu_mem_gb, wait_for_residual_or_proceed

MIB = 1024**2
GIB = 1024**3
SPAWN = multiprocessing.get_context("spawn")  # as miles' launch_server_process starts SGLang

# ---------- a fake nvidia-smi, first on PATH ----------

FAKE_NVIDIA_SMI = """#!{python}
# A fake nvidia-smi: answers --query-gpu=FIELDS [--id=IDS] from smi.json beside it.
import json, os, sys, time
here = os.path.dirname(os.path.realpath(__file__))
with open(os.path.join(here, "smi.json")) as handle:
    config = json.load(handle)
with open(os.path.join(here, "calls.log"), "a") as handle:
    handle.write(" ".join(sys.argv[1:]) + "\\n")
time.sleep(config["sleep"])
if config["raw"] is not None:
    sys.stdout.buffer.write(bytes.fromhex(config["raw"]))
    sys.exit(config["rc"])
args = dict(arg.split("=", 1) for arg in sys.argv[1:] if "=" in arg)
used = config["used"]
ids = args["--id"].split(",") if "--id" in args else [str(i) for i in range(len(used))]
if not all(i.isdigit() and int(i) < len(used) for i in ids):
    print("No devices were found")
    sys.exit(6)
for i in ids:
    row = {{"index": i, "uuid": "GPU-fake-" + i, "pci.bus_id": "00000000:%02X:00.0" % (0x18 + int(i)),
           "memory.used": used[int(i)]}}
    print(", ".join(row[field] for field in args["--query-gpu"].split(",")))
sys.exit(config["rc"])
"""


class FakeSmi:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / "nvidia-smi"
        self.path.write_text(FAKE_NVIDIA_SMI.format(python=shebang_python()))
        self.path.chmod(0o755)
        self.set()

    def set(self, used=("0", "0"), rc: int = 0, sleep: float = 0.0, raw: bytes | None = None) -> None:
        """`used`: what memory.used shows per GPU (MiB, as nvidia-smi prints it, or "[N/A]")."""
        body = {"used": list(used), "rc": rc, "sleep": sleep, "raw": None if raw is None else raw.hex()}
        tmp = self.dir / ".smi.json"
        tmp.write_text(json.dumps(body))
        os.replace(tmp, self.dir / "smi.json")

    def calls(self) -> list[str]:
        log = self.dir / "calls.log"
        return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def smi(tmp_path, monkeypatch) -> FakeSmi:
    directory = tmp_path / "bin"
    directory.mkdir()
    fake = FakeSmi(directory)
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("GPU_RESIDENCY_GATE_SOURCE", "nvidia-smi")  # not the fake NVML another test loaded
    for name in ("GPU_RESIDENCY_PROMETHEUS_URL", "GPU_RESIDENCY_GATE_THRESHOLD_GB", "MILES_MAX_RESIDUAL_GPU_MEM_GB"):
        monkeypatch.delenv(name, raising=False)
    return fake


def messages(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name == "gate.compat"]


# ---------- RLix: probe_max_used_gpu_mem_gb ----------


def test_probe_is_the_max_over_the_gpus_in_gib_and_reads_fractional_mib(smi):
    smi.set(["1024", "2048"])
    assert probe_max_used_gpu_mem_gb([0, 1]) == 2.0
    smi.set(["1024.5", "512"])
    assert probe_max_used_gpu_mem_gb([0, 1]) == 1024.5 / 1024
    assert probe_max_used_gpu_mem_gb([1]) == 0.5


def test_probe_leaves_a_gpu_answering_na_out_of_the_max_and_names_it(smi, caplog):
    caplog.set_level(logging.DEBUG, logger="gate.compat")
    smi.set(["[N/A]", "512"])
    assert probe_max_used_gpu_mem_gb([0, 1]) == 0.5
    assert any("GPU 0 (GPU-fake-0) answers [N/A]" in m for m in messages(caplog, logging.WARNING))
    smi.set(["[N/A]", "[N/A]"])
    assert probe_max_used_gpu_mem_gb([0, 1]) is None
    blocked = ResidualGate(100, source="nvidia-smi").check([0])
    assert not blocked.ok and "used memory not available ([N/A])" in blocked.explain(), "the gate stays fail-closed"


def test_probe_of_no_gpus_or_an_unknown_one_is_none(smi):
    assert probe_max_used_gpu_mem_gb([]) is None
    assert smi.calls() == [], "[] is answered without running nvidia-smi"
    assert probe_max_used_gpu_mem_gb([0, 5]) is None


def _missing(smi, monkeypatch):
    monkeypatch.setenv("PATH", str(smi.dir.parent))  # no nvidia-smi there


def _not_executable(smi, monkeypatch):
    smi.path.chmod(0o644)


def _not_a_program(smi, monkeypatch):
    smi.path.write_bytes(b"\x00\x01 not an executable format")  # execve fails: OSError(ENOEXEC)


@pytest.mark.parametrize(
    "break_it",
    [
        _missing,
        _not_executable,
        _not_a_program,
        lambda smi, _: smi.set(rc=6),
        lambda smi, _: smi.set(sleep=5),  # past the 0.5 s timeout below
        lambda smi, _: smi.set(raw=b"0, GPU-fake-0, 00000000:18:00.0, \xff\xfe\n"),  # not UTF-8
    ],
    ids=["missing", "not-executable", "not-a-program", "exit-6", "timeout", "not-utf-8"],
)
def test_probe_runtime_failures_are_none_logged_at_debug_never_raised(smi, monkeypatch, caplog, break_it):
    caplog.set_level(logging.DEBUG, logger="gate.compat")
    smi.set(["1024", "0"])
    break_it(smi, monkeypatch)
    started = time.monotonic()
    assert probe_max_used_gpu_mem_gb([0], timeout_s=0.5) is None
    assert time.monotonic() - started < 3
    assert any(m.startswith("GPU memory probe:") for m in messages(caplog, logging.DEBUG))
    assert messages(caplog, logging.WARNING) == []


def test_probe_does_not_read_the_threshold_environment(smi, monkeypatch):
    smi.set(["1024", "0"])
    monkeypatch.setenv("MILES_MAX_RESIDUAL_GPU_MEM_GB", "abc")
    monkeypatch.setenv("GPU_RESIDENCY_GATE_THRESHOLD_GB", "0")
    assert probe_max_used_gpu_mem_gb([0]) == 1.0


def test_probe_on_nvml_a_gpu_without_a_memory_figure_is_na(nvml, caplog):
    nvml.gpus[0].used = 10 * GIB
    nvml.gpus[1].errors = {"memory": NOT_SUPPORTED}  # what nvidia-smi shows as [N/A]
    nvml.write()
    assert probe_max_used_gpu_mem_gb([0, 1]) == 10.0
    assert any("GPU 1 (" in m and "[N/A]" in m for m in messages(caplog, logging.WARNING))


def test_probing_again_and_again_starts_no_thread_each_time(nvml):
    probe_max_used_gpu_mem_gb([0])
    before = threading.active_count()
    for _ in range(20):
        assert probe_max_used_gpu_mem_gb([0, 1]) == 0.0
    assert threading.active_count() == before


# ---------- RLix: parse_env_positive_float ----------

NAME = "MILES_MAX_RESIDUAL_GPU_MEM_GB"


@pytest.mark.parametrize(
    "raw, expected",
    [(None, 10.0), ("40.5", 40.5), (" 5 ", 5.0), ("1e1", 10.0),
     ("abc", f"{NAME} must be a number, got: 'abc'"), ("", f"{NAME} must be a number, got: ''"),
     ("0", f"{NAME} must be > 0, got: 0.0"), ("-1", f"{NAME} must be > 0, got: -1.0"),
     ("-0", f"{NAME} must be > 0, got: -0.0"),
     ("nan", f"{NAME} must be a finite number, got: 'nan'"), ("inf", f"{NAME} must be a finite number, got: 'inf'")],
)  # fmt: skip
def test_parse_env_positive_float_as_rlix(monkeypatch, raw, expected):
    if raw is None:
        monkeypatch.delenv(NAME, raising=False)
    else:
        monkeypatch.setenv(NAME, raw)
    if isinstance(expected, float):
        value = parse_env_positive_float(NAME, 10)
        assert value == expected and type(value) is float
        return
    with pytest.raises(RuntimeError) as caught:
        parse_env_positive_float(NAME, 10)
    assert str(caught.value) == expected
    assert isinstance(caught.value, GateConfigError), "the gate's own callers catch it as a configuration error"


# ---------- RLix: the residual wait ----------


def test_rlix_wait_clears_at_the_threshold_inclusive_default_10(smi, caplog):
    caplog.set_level(logging.INFO, logger="gate.compat")
    smi.set(["10240", "512"])  # exactly 10 GiB
    started = time.monotonic()
    assert wait_for_residual_or_proceed([0, 1]) is None
    assert time.monotonic() - started < 2
    assert any("max 10.00 GiB used <= 10.0 GiB" in m for m in messages(caplog, logging.INFO))


def test_rlix_wait_polls_until_the_memory_is_gone(smi, caplog):
    caplog.set_level(logging.INFO, logger="gate.compat")
    smi.set(["20480", "0"])
    threading.Timer(1.0, smi.set, args=(["1024", "0"],)).start()
    started = time.monotonic()
    assert wait_for_residual_or_proceed([0, 1], timeout_s=30) is None
    assert 1.0 <= time.monotonic() - started < 4
    assert any("max 1.00 GiB used" in m for m in messages(caplog, logging.INFO))


def test_rlix_wait_warns_and_goes_ahead_at_timeout(smi, caplog):
    smi.set(["20480", "0"])
    started = time.monotonic()
    assert wait_for_residual_or_proceed([0, 1], timeout_s=1.0) is None
    assert 1.0 <= time.monotonic() - started < 3
    (warning,) = messages(caplog, logging.WARNING)
    assert "timed out after 1.0s: max 20.00 GiB used > 10.0 GiB" in warning and "may OOM" in warning


def test_rlix_wait_that_cannot_measure_sleeps_3s_and_goes_ahead(smi, caplog):
    smi.set(rc=9)
    started = time.monotonic()
    assert wait_for_residual_or_proceed([0, 1], timeout_s=30) is None
    assert 3.0 <= time.monotonic() - started < 5
    (warning,) = messages(caplog, logging.WARNING)
    assert "cannot measure" in warning and "3s grace" in warning


def test_rlix_wait_reads_its_threshold_as_rlix_does(smi, monkeypatch):
    smi.set(["20480", "0"])
    monkeypatch.setenv(NAME, "25")
    assert wait_for_residual_or_proceed([0], timeout_s=5) is None
    for raw, message in (("0", f"{NAME} must be > 0, got: 0.0"), ("abc", f"{NAME} must be a number, got: 'abc'")):
        monkeypatch.setenv(NAME, raw)
        with pytest.raises(RuntimeError, match=message):
            wait_for_residual_or_proceed([0], timeout_s=5)
        assert wait_for_residual_or_proceed([], timeout_s=5) is None, "nothing allocated: RLix returns first"


def test_rlix_wait_fail_closed_blocks_and_raises_instead(smi, caplog):
    caplog.set_level(logging.INFO, logger="gate.compat")
    smi.set(rc=9)
    started = time.monotonic()
    with pytest.raises(GateTimeout, match="nvidia-smi source: exit 9"):
        wait_for_residual_or_proceed([0, 1], timeout_s=1.0, fail_closed=True)
    assert time.monotonic() - started < 2.5, "no grace sleep: it waited for the GPUs and gave up"
    warnings = messages(caplog, logging.WARNING)
    assert any("cannot measure" in m and "blocking" in m for m in warnings)
    assert any("timed out" in m for m in warnings)
    smi.set(["512", "0"])
    assert wait_for_residual_or_proceed([0, 1], fail_closed=True) is None
    assert any("max 0.50 GiB used < 10.00 GiB" in m for m in messages(caplog, logging.INFO))


def test_rlix_contracts_side_by_side_on_the_same_inputs(smi, caplog):
    """PR #11 polls and proceeds; RLix's newer pipeline looks once and raises (default 7 GiB, exactly
    at the threshold passes, blind is fail-open at once). One argument picks."""
    caplog.set_level(logging.INFO, logger="gate.compat")
    smi.set(["7168", "512"])  # exactly 7 GiB
    assert wait_for_residual_or_proceed([0, 1], contract="probe-once") is None
    smi.set(["10240", "512"])  # exactly 10 GiB: PR #11 clears (its default is 10), the newer one raises
    assert wait_for_residual_or_proceed([0, 1], contract="poll") is None
    with pytest.raises(RuntimeError, match=r"^Post-offload whole-GPU residual 10\.00 GiB exceeds threshold 7\.00 GiB"):
        wait_for_residual_or_proceed([0, 1], contract="probe-once")
    smi.set(["20480", "0"])
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"on overlap GPUs \[0, 1\]"):
        wait_for_residual_or_proceed([0, 1], timeout_s=30, contract="probe-once")
    assert time.monotonic() - started < 2, "one look, no polling"
    assert len(smi.calls()) == 4, "one nvidia-smi run a look, four looks"
    smi.set(rc=9)
    started = time.monotonic()
    assert wait_for_residual_or_proceed([0, 1], contract="probe-once") is None
    assert time.monotonic() - started < 2, "blind: fail-open at once, no grace sleep"
    assert any("fail-open" in m for m in messages(caplog, logging.WARNING))
    with pytest.raises(GateConfigError, match="contract='newest' must be one of poll, probe-once"):
        wait_for_residual_or_proceed([0], contract="newest")


def test_rlix_probe_once_reads_its_threshold_as_rlix_does(smi, monkeypatch):
    smi.set(["12288", "0"])
    monkeypatch.setenv(NAME, "13")  # the smoke configuration's value
    assert wait_for_residual_or_proceed([0], contract="probe-once") is None
    monkeypatch.setenv(NAME, "abc")
    with pytest.raises(RuntimeError, match=f"{NAME} must be a number, got: 'abc'"):
        wait_for_residual_or_proceed([0], contract="probe-once")


# ---------- miles: wait_server_healthy ----------


def spawn_engine(**options) -> tuple[multiprocessing.Process, str]:
    """An engine process as miles starts one (multiprocessing, spawn) serving a fake SGLang."""
    urls = SPAWN.Queue()
    process = SPAWN.Process(target=fakenvml.sglang.serve, args=(urls,), kwargs={"lifetime": 60, **options})
    process.start()
    return process, urls.get(timeout=60)


def popen_engine(*args: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "fakenvml.sglang", "--lifetime", "60", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    return process, process.stdout.readline().strip()


@pytest.fixture
def engines():
    started: list = []
    yield started
    for process in started:
        if isinstance(process, subprocess.Popen):
            process.kill()
            process.wait()
        else:
            process.kill()
            process.join()


def seen(url: str) -> list[list]:
    return requests.get(url + "/_fake/requests", timeout=10).json()


def test_waits_for_health_generate_then_flush_cache_with_the_api_key(engines):
    from exporter.exits import wait_server_healthy

    process, url = spawn_engine(health_after=2.0, api_key="secret")
    engines.append(process)
    took = wait_server_healthy(base_url=url, api_key="secret", process=process)  # miles PR #572's call
    assert took >= 2.0, "no overall timeout: it waited for the model to load"
    paths = [path for path, _ in seen(url)]
    assert "/health" not in paths and paths[0] == "/health_generate" and paths[-1] == "/flush_cache"
    assert paths.count("/health_generate") >= 2 and paths.index("/flush_cache") == len(paths) - 1
    assert {auth for _, auth in seen(url)} == {"Bearer secret"}


def test_miles_main_call_with_is_process_alive(engines):
    from exporter.exits import wait_server_healthy

    process, url = spawn_engine()
    engines.append(process)
    wait_server_healthy(base_url=url, api_key=None, is_process_alive=lambda: process.is_alive())
    assert [path for path, _ in seen(url)] == ["/health_generate", "/flush_cache"]
    assert {auth for _, auth in seen(url)} == {None}, "no key: no Authorization header (miles sends 'Bearer None')"


def test_external_engine_without_a_process():
    from exporter.exits import wait_server_healthy

    server = FakeSglang(health_after=1.0, lifetime=30)
    try:
        wait_server_healthy(base_url=server.url, api_key=None, is_process_alive=lambda: True)  # miles' external path
        wait_server_healthy(server.url)  # no process at all
    finally:
        server.stop()


def _assert_killed_during(text: str, phase: str, url: str) -> None:
    assert text.startswith(f"Server process terminated unexpectedly during {phase}. exitcode=-9, elapsed=")
    assert f"url={url} (killed by SIGKILL); killed by SIGKILL: the kernel OOM killer" in text
    assert "SGLang's launcher killing its tree" in text and "likely an OOM" not in text


def test_an_engine_dying_during_flush_cache_is_an_error_not_healthy(engines):
    from exporter.exits import wait_server_healthy

    process, url = spawn_engine(flush="die")
    engines.append(process)
    with pytest.raises(RuntimeError) as caught:
        wait_server_healthy(base_url=url, api_key=None, process=process)
    assert process.exitcode == -signal.SIGKILL
    _assert_killed_during(str(caught.value), "flush_cache", url)


def test_an_engine_killed_while_flush_cache_hangs_is_noticed_at_once(engines):
    from exporter.exits import EngineExitedError, wait_server_healthy

    process, url = popen_engine("--flush", "hang")
    engines.append(process)
    threading.Timer(1.5, process.kill).start()  # SIGKILL from outside, the request still open
    started = time.monotonic()
    with pytest.raises(EngineExitedError) as caught:
        wait_server_healthy(url, process)
    assert time.monotonic() - started < 1.5 + 2
    assert caught.value.exitcode == -9
    _assert_killed_during(str(caught.value), "flush_cache", url)


def test_a_hanging_flush_cache_times_out_only_when_asked(caplog):
    from exporter.exits import wait_server_healthy

    server = FakeSglang(flush="hang", lifetime=30)
    try:
        with pytest.raises(TimeoutError, match=r"not healthy after 1\.5s, during flush_cache"):
            wait_server_healthy(base_url=server.url, timeout=1.5)
    finally:
        server.stop()
    assert [r.levelname for r in caplog.records if r.name == "exporter.exits"] == ["WARNING"]


def test_death_during_health_generate_check_as_miles_main_and_pr_572_call(engines):
    from exporter.exits import wait_server_healthy

    for style in ("main", "pr572"):
        process, url = spawn_engine(health_after=3600)
        engines.append(process)
        threading.Timer(1.0, process.kill).start()
        with pytest.raises(RuntimeError) as caught:
            if style == "main":  # only a callable: no exit code to report, as in PR #572
                wait_server_healthy(base_url=url, api_key="k", is_process_alive=lambda p=process: p.is_alive())
            else:
                wait_server_healthy(base_url=url, api_key="k", process=process)
        text = str(caught.value)
        if style == "main":
            assert text.startswith("Server process terminated unexpectedly during health_generate check. exitcode=None")
        else:
            _assert_killed_during(text, "health_generate check", url)


class NemoRlSGLangGenerationWorker:
    """NeMo-RL 7ea279ab's shape: `_wait_server_healthy` is a method taking `process_alive_fn`; the
    one-line swap makes it ours."""

    from exporter.exits import wait_server_healthy

    _wait_server_healthy = staticmethod(wait_server_healthy)
    del wait_server_healthy

    def launch(self, url: str, process) -> None:
        self._wait_server_healthy(base_url=url, api_key="k", process_alive_fn=lambda: process.is_alive())


def test_slime_and_nemo_rl_call_shapes_on_miles_cases(engines):
    """slime 624b824a calls `_wait_server_healthy(base_url=, api_key=, is_process_alive=)` (miles'
    main shape, a module function); NeMo-RL calls its method with `process_alive_fn=`. Healthy: both
    phases, the key as a Bearer token; a death while waiting: miles' error, at once."""
    from exporter.exits import wait_server_healthy as slime_wait_server_healthy

    process, url = spawn_engine()
    engines.append(process)
    slime_wait_server_healthy(base_url=url, api_key="k", is_process_alive=lambda: process.is_alive())
    NemoRlSGLangGenerationWorker().launch(url, process)
    assert [path for path, _ in seen(url)] == ["/health_generate", "/flush_cache"] * 2
    assert {auth for _, auth in seen(url)} == {"Bearer k"}
    for call in (
        lambda url, p: slime_wait_server_healthy(base_url=url, api_key="k", is_process_alive=lambda: p.is_alive()),
        lambda url, p: NemoRlSGLangGenerationWorker().launch(url, p),
    ):
        dying, dying_url = spawn_engine(health_after=3600)
        engines.append(dying)
        threading.Timer(1.0, dying.kill).start()
        with pytest.raises(RuntimeError, match=r"^Server process terminated unexpectedly during health_generate"):
            call(dying_url, dying)
    with pytest.raises(TypeError, match="not both"):
        slime_wait_server_healthy(url, is_process_alive=lambda: True, process_alive_fn=lambda: True)


def test_an_unwritable_registry_never_replaces_the_real_error(tmp_path, caplog):
    from exporter.exits import EngineExitedError, wait_server_healthy

    not_a_directory = tmp_path / "registry"
    not_a_directory.write_text("")
    process = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    with pytest.raises(EngineExitedError, match="terminated unexpectedly during health_generate check"):
        wait_server_healthy("http://127.0.0.1:9", process, engine="e", directory=not_a_directory)
    assert any("could not record the exit of engine e" in r.getMessage() for r in caplog.records)


# ---------- rlops/miles: query_process_tree_gpu_used_gb ----------


@pytest.fixture
def tree_probe(nvml, spawn_tree, monkeypatch):
    """query_process_tree_gpu_used_gb on the fake NVML, and a real tree: root -> child -> leaves 100, 200."""
    import exporter.gpu_probe

    monkeypatch.setattr(exporter.gpu_probe, "_sources", {})  # a source started before the fake NVML was loaded
    tree = spawn_tree(leaves=2)
    pids = {100: tree.leaves[0], 200: tree.leaves[1], "root": tree.pid, 999: os.getpid()}  # 999: not in the tree

    def measure(gpu0=(), gpu1=()):
        """Each GPU's processes as (pid, MiB), MiB None when NVML cannot say, as miles' rows."""
        for gpu, rows in zip(nvml.gpus, (gpu0, gpu1), strict=True):
            gpu.processes = [(pids[pid], -1 if mib is None else mib * MIB) for pid, mib in rows]
        nvml.write()
        return exporter.gpu_probe.query_process_tree_gpu_used_gb(tree.pid)

    return measure


@pytest.mark.parametrize(
    "gpu0, gpu1, expected",
    [
        ([(100, 500), (200, 1024)], [(100, 2000)], 2000 / 1024),  # max over GPUs of the per-GPU sum
        ([(100, 500), (200, 256)], [], 756 / 1024),  # summed on one GPU
        ([(100, 500)], [(999, 9000)], 500 / 1024),  # a process outside the tree is not counted
        ([], [(999, 9000)], None),  # nothing of the tree on any GPU: cannot measure, not 0
        ([], [], None),
        ([(100, None)], [], None),  # usage unknown: skipped, as miles skips "[N/A]"
        ([(100, None), (200, 512)], [], 0.5),
        ([(100, 0)], [], 0.0),  # a tree process holding nothing is 0.0, not None
        ([("root", 1024)], [(200, 3072)], 3.0),  # the root itself counts
    ],
)
def test_process_tree_probe_agrees_with_miles(tree_probe, gpu0, gpu1, expected):
    assert tree_probe(gpu0, gpu1) == expected


def test_process_tree_probe_without_nvml_or_a_root_is_none(tree_probe, monkeypatch):
    import exporter.gpu_probe

    assert exporter.gpu_probe.query_process_tree_gpu_used_gb(None) is None
    monkeypatch.setattr(exporter.gpu_probe, "_sources", {})
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    assert tree_probe([(100, 500)]) is None


def test_process_tree_probe_imports_nothing_heavy(fake_nvml_dir, scenario, spawn_tree):
    tree = spawn_tree()
    scenario.gpus[1].processes = [(tree.leaves[0], 1536 * MIB)]
    scenario.write()
    code = (
        "import sys; from exporter.gpu_probe import query_process_tree_gpu_used_gb as q; "
        f"print(q({tree.pid}, timeout_s=5.0), sorted({{m.split('.')[0] for m in sys.modules}} & "
        "{'prometheus_client', 'requests', 'psutil', 'yaml'}))"
    )
    env = dict(scenario.environ(fake_nvml_dir), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert out.stdout.split() == ["1.5", "[]"], out.stderr
