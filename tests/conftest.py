"""Shared fixtures: the fake NVML, real process trees, and the exporter as a real process."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import fakenvml
from fakenvml import Scenario
from fakenvml.fake_http import stop_process
from fakenvml.lifetime import with_alarm
from fakenvml.prometheus import PrometheusServer, start_prometheus
from fakenvml.sglang import FakeSglang
from fakenvml.tree import Tree
from fakenvml.tree import start as start_tree
from fakenvml.vllm import FakeVllm
from fakenvml.vllm_serve import VllmProcess, console_script, launch

ROOT = Path(__file__).resolve().parent.parent
# CI sets this so that a missing system tool fails the suite instead of skipping.
REQUIRE_TOOLS = os.environ.get("GPU_RESIDENCY_REQUIRE_TOOLS") == "1"


# Every process the suite starts inherits this mark in its environment (children are started
# with os.environ as their base); at the end, any process still carrying it outlived its test.
SESSION_MARK = "GPU_RESIDENCY_TEST_SESSION"
# How long processes that are stopping anyway get before they count as left behind.
RESOURCE_TRACKER = "multiprocessing.resource_tracker"
LEFTOVER_GRACE_S = float(os.environ.get("GPU_RESIDENCY_LEFTOVER_GRACE_S", "15"))


def pytest_configure(config: pytest.Config) -> None:
    os.environ[SESSION_MARK] = f"{os.getpid()}-{time.time_ns()}"


def processes_marked(mark: str) -> dict[int, str]:
    """PID -> command line of every live process (not a zombie) whose environment carries `mark`."""
    wanted = f"{SESSION_MARK}={mark}".encode()
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            if wanted not in Path(f"/proc/{name}/environ").read_bytes().split(b"\0"):
                continue
            stat = Path(f"/proc/{name}/stat").read_text()
            if stat[stat.rfind(")") + 2] in "ZX":
                continue
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
            if RESOURCE_TRACKER in cmdline and int(stat[stat.rfind(")") + 2 :].split()[1]) == os.getpid():
                continue  # multiprocessing's helper of this very process: it ends when the session does
            found[int(name)] = cmdline
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run, naming them, if processes started by the suite are still alive at its end."""
    mark = os.environ.get(SESSION_MARK)
    if not mark:
        return
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while (left := processes_marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not left:
        return
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    lines = "\n".join(f"  pid {pid}: {cmdline}" for pid, cmdline in sorted(left.items()))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"{len(left)} process(es) started by the tests outlived the session (now killed):\n{lines}"
    if reporter is not None:
        reporter.write_line(message, red=True)
    else:
        print(message, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def require_tool(name: str) -> str:
    """Path of a system binary; skip without it, or fail when CI requires every tool."""
    path = shutil.which(name)
    if path is None:
        package = "prometheus" if name in ("prometheus", "promtool") else name
        message = f"{name} not installed (Debian: apt-get install -y {package})"
        if REQUIRE_TOOLS:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def fake_nvml_dir(tmp_path_factory) -> Path:
    require_tool("cc")
    return fakenvml.build(tmp_path_factory.mktemp("fakenvml"))


@pytest.fixture
def scenario(tmp_path) -> Scenario:
    s = Scenario.with_gpus(tmp_path / "scenario.json", 2)
    s.write()
    return s


@pytest.fixture
def nvml(fake_nvml_dir, scenario, monkeypatch):
    """The fake NVML loaded in this process (the binding's dlopen by soname finds it), and the
    gate's environment pointing at it."""
    monkeypatch.setenv("FAKE_NVML_SCENARIO", str(scenario.path))
    monkeypatch.setenv("GPU_RESIDENCY_GATE_SOURCE", "nvml")
    monkeypatch.delenv("GPU_RESIDENCY_PROMETHEUS_URL", raising=False)
    ctypes.CDLL(str(fake_nvml_dir / fakenvml.SONAME))
    return scenario


def visible_devices(scenario: Scenario) -> str:
    """$NVIDIA_VISIBLE_DEVICES as the device plugin sets it for a pod given every GPU of `scenario`:
    a gate reading the node's exporter or Prometheus numbers its GPUs by it."""
    return ",".join(gpu.uuid for gpu in scenario.gpus)


def gate_waiting_for(scenario: Scenario, engine: str, gpus: str, threshold_gb: str, *source: str):
    """`gpu-residency-gate check` waiting for `engine`'s release, from `source` (e.g. "--source",
    "prometheus", "--prometheus-url", URL), numbering GPUs as a pod given every GPU of `scenario`
    does; the finished process (stdout holds the explanation)."""
    return subprocess.run(
        [sys.executable, "-m", "gate", "check", "--gpus", gpus, *source, "--node", "test-node", "--threshold-gb",
         threshold_gb, "--waiting-for", engine],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
        env=dict(os.environ, NVIDIA_VISIBLE_DEVICES=visible_devices(scenario)),
    )  # fmt: skip


@pytest.fixture
def spawn_tree() -> Iterator:
    """Real process trees (root -> child -> leaves) stopped after the test."""
    trees: list[Tree] = []

    def spawn(leaves: int = 1, depth: int = 2, title: str = "sglang::scheduler_TP{rank}") -> Tree:
        trees.append(start_tree(leaves, depth, title, max_seconds=300))
        return trees[-1]

    yield spawn
    for tree in trees:
        tree.stop()


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Family name -> [(labels, value)] using prometheus_client's own text parser."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def values(metrics: dict, name: str, **labels: str) -> list[float]:
    """Values of the samples of `name` whose labels include `labels`."""
    return [v for lbl, v in metrics.get(name, []) if all(lbl.get(k) == str(w) for k, w in labels.items())]


def one(metrics: dict, name: str, **labels: str) -> float:
    found = values(metrics, name, **labels)
    assert len(found) == 1, f"expected one {name}{labels}, found {found}"
    return found[0]


def scrape_families(source, *engines) -> dict:
    """What a concern (an object with .families(snapshot)) publishes for a snapshot holding `engines`."""
    from prometheus_client import CollectorRegistry, generate_latest

    from exporter.snapshot.attribution import Snapshot
    from exporter.sources.nvml import NvmlReading

    class One:
        def collect(self):
            return source.families(Snapshot(NvmlReading(True, ()), tuple(engines), (), (), ()))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())
    return parse_metrics(generate_latest(registry).decode())


def polled(poller, *engines) -> dict:
    """A scrape tells the poller its engines; one poll; the next scrape shows the results."""
    scrape_families(poller, *engines)
    poller.poll_once()
    return scrape_families(poller, *engines)


def scrape_until(exporter, ready, timeout: float = 20.0) -> dict:
    """Scrape until `ready(metrics)` (bounded), else fail with the exporter's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = exporter.scrape()
        if ready(metrics):
            return metrics
        time.sleep(0.1)
    raise AssertionError(f"condition not met in {timeout}s:\n{exporter.log()[-3000:]}")


@dataclass
class ExporterProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path
    args: list[str] = field(default_factory=list)

    def scrape(self) -> dict:
        response = requests.get(self.url + "/metrics", timeout=10)
        response.raise_for_status()
        return parse_metrics(response.text)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        return stop_process(self.proc)


EXPORTER_LIFETIME_S = 900  # an exporter a test started ends by itself after this, whatever its fixture does
LISTENING = re.compile(r"listening on (https?://[^/\s]+)")


def start_exporter(
    tmp_path: Path, args: list[str], env: dict[str, str], timeout: float = 30.0, wrapper: list[str] = ()
) -> ExporterProcess:
    """Run `python -m exporter` on a free loopback port and wait until it serves."""
    stamp = time.monotonic_ns()
    log_path = tmp_path / f"exporter-{stamp}.log"
    handle = log_path.open("w")
    log_path.chmod(0o666)  # an exporter run as another user (wrapper) writes it too
    defaults = {
        "--state.dir": str(tmp_path / f"state-{stamp}"),  # never the machine's /var/lib/gpu-residency
        "--exits.first-zero-seconds": "0",  # tests read exit counts at once; the hold has its own test
    }
    for flag, value in defaults.items():
        if flag not in args:
            args = [*args, flag, value]
    full = [
        *wrapper,
        sys.executable,
        "-m",
        "exporter",
        "--web.listen-address",
        "127.0.0.1:0",
        "--node",
        "test-node",
        *args,
    ]
    environ = dict(env, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(with_alarm(full, EXPORTER_LIFETIME_S), stdout=handle, stderr=subprocess.STDOUT, env=environ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = LISTENING.search(log_path.read_text())
        if match:
            return ExporterProcess(proc, match.group(1), log_path, full)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"exporter did not start:\n{log_path.read_text()}")


def require_root_tools() -> tuple[str, str]:
    """(unshare, setpriv), or skip (fail in CI) where namespaces and capability dropping are not possible."""
    if os.geteuid() != 0:
        message = "needs root to create namespaces and drop capabilities"
        if REQUIRE_TOOLS:
            pytest.fail(message)
        pytest.skip(message)
    return require_tool("unshare"), require_tool("setpriv")


def as_deployed(writable: list[Path]) -> list[str]:
    """A command prefix that runs the exporter as the chart does: root with every capability
    dropped and no new privileges, the root filesystem read-only except `writable` (the chart's
    volumes), in the host's PID namespace (hostPID)."""
    unshare, setpriv = require_root_tools()
    binds = "".join(f"mount --bind {shlex.quote(str(p))} {shlex.quote(str(p))} && " for p in writable)
    script = (
        f'{binds}mount -o remount,bind,ro / && exec {setpriv} --bounding-set=-all --inh-caps=-all --no-new-privs "$@"'
    )
    return [unshare, "--mount", "sh", "-c", script, "as-deployed"]


def in_container(uid: int = 1000, umask: str = "077", own_network: bool = False) -> list[str]:
    """A command prefix that runs a framework as in a pod without hostPID: its own PID namespace
    with its own /proc (and, with `own_network`, its own network namespace: the pod network), as
    a non-root user, with a strict umask."""
    unshare, setpriv = require_root_tools()
    network = ["--net"] if own_network else []
    return [unshare, "--pid", "--fork", "--mount-proc", *network, setpriv, f"--reuid={uid}", f"--regid={uid}",
            "--clear-groups", "sh", "-c", f'umask {umask} && exec "$@"', "in-container"]  # fmt: skip


PACKAGES = ("exporter", "gate", "fakenvml", "gpu_residency_common")  # what code run as another user imports


@pytest.fixture(scope="session")
def env_for_others() -> Iterator[dict[str, str]]:
    """The environment for code run as another user (uid 1000 in a pod): PYTHONPATH names a copy of
    the project's packages in a world-readable directory, made here. The checkout itself may sit in
    a 0700 home, or have been cloned under umask 077: uid 1000 cannot read it."""
    base = Path(tempfile.mkdtemp(prefix="gpu-residency-code-"))
    for package in PACKAGES:
        shutil.copytree(ROOT / package, base / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for directory, _, files in os.walk(base):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    yield dict(os.environ, PYTHONPATH=str(base))
    shutil.rmtree(base, ignore_errors=True)


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, children first (from /proc/<pid>/task/*/children)."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop(0)
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError):
                children = [int(c) for c in Path(f"/proc/{parent}/task/{task}/children").read_text().split()]
                found += children
                queue += children
    return found


def kill_with_descendants(proc: subprocess.Popen) -> None:
    """SIGKILL a process a test started and everything it started: a launcher's children outlive it
    otherwise. Killing a PID namespace's init (in_container's) makes the kernel kill the whole
    namespace: unshare's --kill-child does not survive setpriv's change of user."""
    for pid in [*descendants(proc.pid)]:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait(timeout=10)


def python_for_others() -> str:
    """An interpreter a non-root user can run: this one if every directory up to it is
    world-searchable, else the system's python3 (the framework helpers need only the standard
    library, which is what a framework's own interpreter brings)."""
    path = Path(sys.executable).resolve()
    if all(parent.stat().st_mode & 0o001 for parent in path.parents):
        return sys.executable
    return require_tool("python3") if Path("/usr/bin/python3").exists() is False else "/usr/bin/python3"


def host_pid_of(inner_pid: int, under: int) -> int:
    """The host PID of the process that is `inner_pid` in the PID namespace started by process `under`."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            status = Path(f"/proc/{name}/status").read_text()
        except OSError:
            continue
        nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
        if len(nspid) >= 2 and int(nspid[-1]) == inner_pid and _descends_from(int(name), under):
            return int(name)
    raise LookupError(f"no process {inner_pid} under {under}")


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat[stat.rfind(")") + 2 :].split()[1])
        if pid <= 1:
            return False
    return False


@pytest.fixture
def exporter_factory(tmp_path, fake_nvml_dir) -> Iterator:
    started: list[ExporterProcess] = []

    def factory(
        scenario: Scenario | None, *args: str, env: dict[str, str] | None = None, wrapper: list[str] = ()
    ) -> ExporterProcess:
        environ = scenario.environ(fake_nvml_dir) if scenario else dict(os.environ)
        environ.update(env or {})
        exporter = start_exporter(tmp_path, list(args), environ, wrapper=wrapper)
        started.append(exporter)
        return exporter

    yield factory
    for exporter in started:
        exporter.stop()


@dataclass
class LocalExporter:
    """The exporter's collector in this process, on the fake NVML: fast and fully real below HTTP."""

    collector: object
    registry_dir: Path
    errors: object

    def scrape(self) -> dict:
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        return parse_metrics(generate_latest(registry).decode())


@pytest.fixture
def local_exporter(tmp_path, fake_nvml_dir, scenario, monkeypatch) -> LocalExporter:
    """The CLI's own assembly (build_exporter), in-process; background workers are not started."""
    monkeypatch.setenv("FAKE_NVML_SCENARIO", str(scenario.path))
    return build_local(tmp_path / "engines", tmp_path / "state", fake_nvml_dir)


def build_local(registry_dir: Path, state_dir: Path | None, fake_nvml_dir: Path, *extra: str) -> LocalExporter:
    """Another in-process assembly: on the same registry and state directory, it is a restart."""
    from exporter.cli import build_parser
    from exporter.errors import ErrorCounter
    from exporter.runtime import build_exporter

    args = build_parser().parse_args(
        ["--node", "test-node", "--registry.dir", str(registry_dir), "--no-engines.discover",
         "--collection.min-interval", "0", "--state.dir", str(state_dir or ""), "--exits.first-zero-seconds", "0",
         "--nvml.library", str(fake_nvml_dir / fakenvml.SONAME), *extra]
    )  # fmt: skip
    errors = ErrorCounter()
    return LocalExporter(build_exporter(args, errors).collector, registry_dir, errors)


MEMORY_CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def own_memory_cgroup() -> Path:
    """This process's cgroup v1 memory cgroup directory (the `memory` line of /proc/self/cgroup)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return MEMORY_CGROUP_ROOT / path.lstrip("/")
    raise LookupError("no cgroup v1 memory controller")


@pytest.fixture
def child_cgroup() -> Iterator:
    """make(relative, limit_bytes=None) -> a child memory cgroup under this process's own (cgroup v1, as
    on this machine); processes join by writing to its cgroup.procs. Killed, emptied and removed after."""
    try:
        base = own_memory_cgroup()
        writable = os.access(base, os.W_OK) and (base / "cgroup.procs").exists()
    except (LookupError, OSError):
        writable = False
    if not writable:
        message = "needs a writable cgroup v1 memory controller (root, /sys/fs/cgroup/memory)"
        if REQUIRE_TOOLS:
            pytest.fail(message)
        pytest.skip(message)
    created: list[Path] = []

    def make(relative: str, limit_bytes: int | None = None) -> Path:
        path = base / relative
        for parent in [*reversed(path.relative_to(base).parents[:-1]), path.relative_to(base)]:
            directory = base / parent
            if not directory.exists():
                directory.mkdir()
                created.append(directory)
        if limit_bytes is not None:
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        return path

    yield make
    for directory in reversed(created):
        for _ in range(50):
            pids = [int(p) for p in (directory / "cgroup.procs").read_text().split()]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                directory.rmdir()
                break
            except OSError:
                time.sleep(0.05)


@pytest.fixture
def tls_files(tmp_path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    openssl = require_tool("openssl")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def _fake_servers(make) -> Iterator:
    """A fixture's body: `start(...)` makes a fake server with `make(...)`; every one is stopped after the test."""
    servers: list = []

    def start(*args, **options):
        servers.append(make(*args, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def fake_sglang() -> Iterator:
    """Fake SGLang servers on loopback (fakenvml.sglang): start(mode="new", dp_size=1, **options)."""
    yield from _fake_servers(lambda mode="new", dp_size=1, **options: FakeSglang(mode, dp_size, lifetime=60, **options))


@pytest.fixture
def fake_vllm() -> Iterator:
    """Fake vLLM servers on loopback (fakenvml.vllm): start(version="0.11.1", mode="ok", **options)."""
    yield from _fake_servers(
        lambda version="0.11.1", mode="ok", **options: FakeVllm(version, mode, lifetime=60, **options)
    )


@pytest.fixture
def vllm_serve(tmp_path):
    """Start fake `vllm serve` processes (through a `vllm` console script), stopped after the test."""
    started: list[VllmProcess] = []

    def start(*args: str, dev_mode: bool = True) -> VllmProcess:
        started.append(launch(list(args), script=console_script(tmp_path / "bin"), dev_mode=dev_mode))
        return started[-1]

    yield start
    for process in started:
        process.stop()


PROMETHEUS_LIFETIME_S = 900  # a Prometheus a test started ends by itself after this


@pytest.fixture
def prometheus_factory(tmp_path) -> Iterator:
    binary = require_tool("prometheus")
    started: list[PrometheusServer] = []

    def factory(targets: list[str], rule_files: list[Path] = (), interval: str = "1s", **mode) -> PrometheusServer:
        """`mode`: agent, remote_write, external_labels, receiver (fakenvml.prometheus.start_prometheus)."""
        workdir = tmp_path / f"prometheus-{len(started)}"
        lifetime = PROMETHEUS_LIFETIME_S
        server = start_prometheus(binary, workdir, targets, rule_files, interval, lifetime=lifetime, **mode)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
