"""`gpu-residency-exporter`: serve the node's GPU residency to Prometheus."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from exporter import __version__
from exporter.api import GpuApi
from exporter.causes import CHILD_WINDOW_SECONDS
from exporter.collector import ResidencyCollector
from exporter.engine_state import EngineStates
from exporter.engines import EngineCatalog
from exporter.errors import ErrorCounter
from exporter.exit_log import ExitLog
from exporter.exits import EXITS_PATH
from exporter.exits_api import exits_route
from exporter.forensics import DEFAULT_WINDOW_SECONDS, Forensics
from exporter.gate_records import GateRecords
from exporter.nvml_source import DEFAULT_TIMEOUT_SECONDS as DEFAULT_NVML_TIMEOUT
from exporter.nvml_source import NvmlSource
from exporter.registry import DEFAULT_DIR, REGISTRY_ENV
from exporter.server import (
    DEFAULT_MAX_CONNECTIONS,
    ExporterServer,
    ListenAddressError,
    Route,
    make_responder,
    parse_listen_address,
)
from exporter.sglang import SglangPoller
from exporter.static_engines import ConfigError, load_static_config
from exporter.supervisor import SupervisedLoop
from exporter.transitions import TransitionTracker
from exporter.url_policy import UrlPolicy
from exporter.vllm import VllmPoller
from exporter.web_config import WebConfig, WebConfigError, load_web_config

log = logging.getLogger("exporter")

DEFAULT_LISTEN = ":9852"
DEFAULT_STATE_DIR = "/var/lib/gpu-residency"
COLLECTORS = {
    "gpu": "whole-GPU used, total and reserved memory",
    "processes": "per-process, per-engine and unattributed memory, engine_up",
    "sglang": "SGLang /server_info accounting",
    "vllm": "vLLM sleep level and KV-cache accounting",
    "exits": "engine exits",
    "sleep_wake": "engine state (framework-set or observed), mismatches, release and wake timing",
    "gate": "the gate's last decision per engine",
}
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}

EPILOG = """\
examples:
  gpu-residency-exporter                      serve on :9852/metrics with the node's NVML
  gpu-residency-exporter --demo               a simulated 8-GPU node (no GPU needed)
  gpu-residency-exporter --web.listen-address 127.0.0.1:9852 --log.level debug
  gpu-residency-exporter launch --engine rollout-0 --url http://127.0.0.1:30000 -- \
      python -m sglang.launch_server --port 30000
                                              run an engine as a child and record its exit
                                              (gpu-residency-exporter launch --help)

Engines are found in the registry directory (one JSON file per engine, written by
exporter.registry.register_engine), in --engines.config-file, and by recognising
SGLang and vLLM server launch command lines. Run with hostPID (Kubernetes) or in the host PID
namespace, or NVML's PIDs cannot be matched to processes.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu-residency-exporter",
        description="Prometheus exporter of what really holds GPU memory: whole-GPU used memory (NVML), "
        "per-process and per-engine residency, and unattributed memory.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    web = parser.add_argument_group("web")
    web.add_argument(
        "--web.listen-address",
        dest="listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address to serve on (default {DEFAULT_LISTEN}: all interfaces; port 0 picks a free one)",
    )
    web.add_argument(
        "--web.config.file",
        dest="web_config",
        metavar="FILE",
        help="TLS and basic auth, in the exporter-toolkit web-config format (tls_server_config: cert_file, "
        "key_file; basic_auth_users: user: bcrypt hash); see docs/SECURITY.md",
    )
    web.add_argument(
        "--web.max-connections",
        dest="max_connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help=f"connections served at once, a thread each; more are closed unanswered (default "
        f"{DEFAULT_MAX_CONNECTIONS}; an idle one is closed after 30 s)",
    )
    web.add_argument(
        "--collection.min-interval",
        dest="min_interval",
        type=_non_negative_float,
        default=0.25,
        metavar="SECONDS",
        help="scrapes this close to the last collection reuse it (default 0.25; 0 collects on every scrape); "
        "concurrent scrapes always share one",
    )
    web.add_argument(
        "--web.telemetry-path",
        dest="telemetry_path",
        default="/metrics",
        metavar="PATH",
        help="path of the metrics (default /metrics)",
    )
    engines = parser.add_argument_group("engines")
    engines.add_argument(
        "--registry.dir",
        dest="registry_dir",
        default=os.environ.get(REGISTRY_ENV, DEFAULT_DIR),
        metavar="DIR",
        help=f"engine registry directory (default ${REGISTRY_ENV} or {DEFAULT_DIR}); a missing directory means "
        "no registered engines",
    )
    engines.add_argument(
        "--engines.config-file",
        dest="engines_config",
        metavar="FILE",
        help="TOML file of fixed engines: [[engines]] name, kind, url, and pid_file or root_pid",
    )
    engines.add_argument(
        "--engines.discover",
        dest="discover",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="find SGLang and vLLM servers by their launch command line (default on)",
    )
    _seconds(
        engines,
        "--engines.discovery-interval",
        "discovery_interval",
        10.0,
        "how often discovery scans the process table (default 10)",
    )
    sglang = parser.add_argument_group("sglang accounting and exits")
    _seconds(
        sglang,
        "--sglang.poll-interval",
        "sglang_interval",
        15.0,
        "how often each SGLang engine's /server_info is polled, in the background (default 15; failures back "
        "off up to 300)",
    )
    _seconds(
        sglang,
        "--sglang.timeout",
        "sglang_timeout",
        3.0,
        "read timeout of one poll; connecting has 1 s (default 3)",
    )
    engines.add_argument(
        "--engines.allowed-hosts",
        "--sglang.allowed-hosts",
        dest="engines_allowed",
        default="",
        metavar="LIST",
        help="comma-separated CIDRs, IPs or host names engine URLs may point to, besides loopback and this "
        "node's own addresses (default: none); other URLs are never requested. In a pod without hostNetwork, "
        "add the node's IP ($HOST_IP) for engines on the host network, and the pod CIDR for engines in pods",
    )
    _seconds(
        sglang,
        "--exits.grace-period",
        "exit_grace",
        30.0,
        "how long a registered engine's root may be gone before an exit nobody reported is counted as "
        'exit_code="unknown" (default 30)',
    )
    sglang.add_argument(
        "--exits.first-zero-seconds",
        dest="exit_first_zero",
        type=_non_negative_float,
        default=60.0,
        metavar="SECONDS",
        help="a new exit series is published at 0 for this long first, so increase() and the exit alerts see "
        "an engine's first exit; keep it above your scrape interval (default 60)",
    )
    _seconds(
        sglang,
        "--exits.retention",
        "exit_retention",
        3600.0,
        "exit series of an engine that left the registry are dropped after this (default 3600)",
    )
    sglang.add_argument(
        "--state.dir",
        dest="state_dir",
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"where the exporter keeps its own state (exit counts, events read so far), so a restart or a "
        f"rotated events file loses no count (default {DEFAULT_STATE_DIR}; '' keeps it in memory only)",
    )
    forensics = parser.add_argument_group(
        "crash forensics", "why an engine died (an OOM kill, a child's failure) and what was on its GPUs"
    )
    forensics.add_argument(
        "--forensics.interval",
        dest="forensics_interval",
        type=_non_negative_float,
        default=0.5,
        metavar="SECONDS",
        help="how often engine trees, memory cgroup OOM counters and the kernel log are looked at; a collection "
        "a second feeds the history (default 0.5; 0 turns forensics off: causes are then from exit codes only)",
    )
    _seconds(
        forensics,
        "--forensics.window",
        "forensics_window",
        DEFAULT_WINDOW_SECONDS,
        f"how far back before a death the GPU peak and its holders are looked for (default {DEFAULT_WINDOW_SECONDS:g})",
    )
    _seconds(
        forensics,
        "--forensics.child-window",
        "forensics_child_window",
        CHILD_WINDOW_SECONDS,
        "how long before the root's death a process of its tree that failed (non-zero status or a signal) can be its "
        f"cause (child_failure); an earlier death, or an exit 0, never is (default {CHILD_WINDOW_SECONDS:g})",
    )
    forensics.add_argument(
        "--forensics.cgroup-root",
        dest="forensics_cgroup_root",
        default="/sys/fs/cgroup",
        metavar="DIR",
        help="where the host's cgroup filesystem is mounted (default /sys/fs/cgroup; in a pod, mount the host's "
        "read-only and point here)",
    )
    forensics.add_argument(
        "--forensics.kmsg",
        dest="forensics_kmsg",
        default="/dev/kmsg",
        metavar="PATH",
        help="the kernel log, for OOM-kill lines naming a PID (needs CAP_SYSLOG where dmesg_restrict=1; "
        "'' to skip; default /dev/kmsg)",
    )
    vllm = parser.add_argument_group("vllm (the engine's own sleep state and KV-cache accounting)")
    _seconds(
        vllm,
        "--vllm.poll-interval",
        "vllm_interval",
        2.0,
        "how often each vLLM engine's /metrics (and /is_sleeping, on releases before 0.11.1) is polled, in the "
        "background; an observed sleep or wake is timed from the poll that saw it (default 2; failures back off "
        "up to 300)",
    )
    _seconds(
        vllm,
        "--vllm.timeout",
        "vllm_timeout",
        3.0,
        "read timeout of one poll, beyond the 1 s to connect; every request of a poll shares it (default 3)",
    )
    states = parser.add_argument_group(
        "sleep and wake (engines whose framework sets their state, and engines that report it: vLLM)"
    )
    states.add_argument(
        "--engines.release-floor-gb",
        dest="release_floor_gb",
        type=_positive_float,
        default=2.0,
        metavar="GIB",
        help="an asleep engine counts as released when it holds less than this on every GPU (default 2); vLLM "
        "sleep levels 1 and 2 both free the weights and KV cache on the GPU and are held to it alike, a level-0 "
        "sleep keeps the weights and is not timed",
    )
    _seconds(
        states,
        "--engines.release-timeout",
        "release_timeout",
        60.0,
        "a release not complete after this is counted as a timeout and its holders logged (default 60)",
    )
    _seconds(
        states,
        "--engines.wake-timeout",
        "wake_timeout",
        300.0,
        "likewise for residency coming back after the engine is marked active (default 300)",
    )
    _seconds(
        states,
        "--engines.state-mismatch-grace",
        "mismatch_grace",
        15.0,
        "a framework-set state and the engine's own report may disagree this long (the poll lags the call) before "
        "it counts as a mismatch (default 15)",
    )
    _seconds(
        states,
        "--engines.state-interval",
        "state_interval",
        0.25,
        "how often a release or wake in progress is measured, between scrapes (default 0.25)",
    )
    api = parser.add_argument_group("JSON API (/api/v1/gpus, /api/v1/wait: fresh readings for gates on other nodes)")
    api.add_argument(
        "--api.max-waiters",
        dest="api_max_waiters",
        type=int,
        default=16,
        metavar="N",
        help="long polls at once on /api/v1/wait, and on /api/v1/exits?wait=; more are answered 429 (default 16 each)",
    )
    _seconds(api, "--api.max-wait", "api_max_wait", 60.0, "the longest one long poll lasts (default 60)")
    _seconds(
        api,
        "--api.wait-interval",
        "api_wait_interval",
        0.01,
        "how often NVML is read while anyone waits, and only then (default 0.01)",
    )
    nvml = parser.add_argument_group("nvml")
    nvml.add_argument(
        "--nvml.library",
        dest="nvml_library",
        metavar="PATH",
        help="load libnvidia-ml from this path instead of the loader's search path",
    )
    _seconds(
        nvml,
        "--nvml.timeout",
        "nvml_timeout",
        DEFAULT_NVML_TIMEOUT,
        f"a collection's NVML reads must finish within this, or it reports nvml_up 0 (a hung GPU or driver) "
        f"(default {DEFAULT_NVML_TIMEOUT:g})",
    )
    collectors = parser.add_argument_group(
        "collectors", "each concern is collected in isolation; a failing one loses only its own series"
    )
    for name, help_text in COLLECTORS.items():
        collectors.add_argument(
            f"--collector.{name}",
            dest=f"collector_{name}",
            action=argparse.BooleanOptionalAction,
            default=True,
            help=f"{help_text} (default on)",
        )
    parser.add_argument(
        "--node",
        default=os.environ.get("NODE_NAME") or socket.gethostname(),
        help="value of the node label (default $NODE_NAME, else the host name)",
    )
    parser.add_argument("--log.level", dest="log_level", choices=sorted(LOG_LEVELS), default="info")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="simulate an 8-GPU node (fake NVML, real process trees and engines); needs a C compiler",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _seconds(group: argparse._ArgumentGroup, flag: str, dest: str, default: float, help_text: str) -> None:
    """A duration option: a positive number of seconds."""
    group.add_argument(flag, dest=dest, type=_positive_float, default=default, metavar="SECONDS", help=help_text)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


@dataclass
class Exporter:
    """Everything one exporter process runs: the collector, its background loops and its API."""

    collector: ResidencyCollector
    catalog: EngineCatalog
    poller: SglangPoller
    transitions: TransitionTracker
    exits: ExitLog
    vllm: VllmPoller | None = None
    forensics: Forensics | None = None
    nvml: NvmlSource | None = None  # the collector's, shared with the JSON API's long poll
    loops: list[SupervisedLoop] = field(default_factory=list)
    routes: dict[str, Route] = field(default_factory=dict)
    _watched: dict = field(default_factory=dict)

    def start(self) -> None:
        self.catalog.start()
        self.poller.start()
        if self.vllm is not None:
            self.vllm.start()
        for loop in self.loops:
            loop.start()

    def stop(self) -> None:
        for loop in self.loops:
            loop.stop()
        if self.vllm is not None:
            self.vllm.stop()
        self.poller.stop()
        self.catalog.stop()

    def watch_transitions(self) -> None:
        """Time releases and wakes between scrapes: a full collection only while one is under way,
        the registry directory changed (a state change renames a file into it) or an engine's own
        report of its state changed."""
        seen = (self.catalog.registry_mtime(), self.transitions.states.changes())
        if not self.transitions.pending() and seen == self._watched.get("seen"):
            return
        self._watched["seen"] = seen
        snapshot, _ = self.collector.snapshot(max_age=0)
        self.transitions.observe(snapshot)

    def watch_exits(self) -> None:
        """Crash forensics between scrapes: every look checks the engines' trees, their OOM
        counters and the kernel log; a collection a second feeds the history, and exits are
        counted with their evidence as soon as it is in."""
        snapshot, _ = self.collector.snapshot(max_age=1.0)
        self.forensics.tick(snapshot.engines)
        self.exits.update(snapshot)


def build_exporter(args: argparse.Namespace, errors: ErrorCounter) -> Exporter:
    static = load_static_config(args.engines_config) if args.engines_config else []
    registry_dir = Path(args.registry_dir)
    catalog = EngineCatalog(
        errors,
        registry_dir=registry_dir,
        static=static,
        discover=args.discover,
        discovery_interval=args.discovery_interval,
    )
    allowed = [item.strip() for item in args.engines_allowed.split(",") if item.strip()]
    poller = SglangPoller(
        args.node,
        errors,
        UrlPolicy.default(allowed),
        interval=args.sglang_interval,
        read_timeout=args.sglang_timeout,
        engines=lambda: catalog.current(max_age=5.0),
    )
    forensics = None
    if args.forensics_interval > 0:
        forensics = Forensics(
            args.node,
            errors,
            window_seconds=args.forensics_window,
            child_window=args.forensics_child_window,
            cgroup_root=Path(args.forensics_cgroup_root),
            kmsg=args.forensics_kmsg or None,
        )
    exits = ExitLog(
        args.node,
        registry_dir,
        errors,
        grace_seconds=args.exit_grace,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        first_zero_seconds=args.exit_first_zero,
        retention_seconds=args.exit_retention,
        forensics=forensics,
    )
    vllm = VllmPoller(
        args.node,
        errors,
        UrlPolicy.default(allowed),
        interval=args.vllm_interval,
        read_timeout=args.vllm_timeout,
        engines=lambda: catalog.current(max_age=min(5.0, args.vllm_interval)),
    )
    states = EngineStates(args.node, observers=[vllm], grace=args.mismatch_grace)
    transitions = TransitionTracker(
        args.node, int(args.release_floor_gb * 1024**3), args.release_timeout, args.wake_timeout, states
    )
    gate_records = GateRecords(args.node, registry_dir, errors)
    nvml = NvmlSource(errors, library_path=args.nvml_library, timeout=args.nvml_timeout)
    concerns = [
        ("sglang", poller.families),
        ("vllm", vllm.families),
        ("exits", exits.families),
        ("sleep_wake", transitions.families),
        ("gate", gate_records.families),
    ]
    disabled = [name for name in COLLECTORS if not getattr(args, f"collector_{name}")]
    collector = ResidencyCollector(
        args.node,
        nvml,
        catalog,
        errors,
        concerns=concerns,
        min_interval=args.min_interval,
        disabled=disabled,
        observers=[forensics.record] if forensics is not None else [],
    )
    exporter = Exporter(collector, catalog, poller, transitions, exits, vllm, forensics, nvml)
    # The JSON API for gates on other nodes: the collector's NVML source serves its long poll.
    exporter.routes.update(
        GpuApi(
            args.node,
            collector,
            nvml,
            errors,
            max_waiters=args.api_max_waiters,
            max_wait=args.api_max_wait,
            interval=args.api_wait_interval,
        ).routes()
    )
    if "sleep_wake" not in disabled:
        exporter.loops.append(SupervisedLoop("transitions", exporter.watch_transitions, args.state_interval, errors))
    if "exits" not in disabled:
        if forensics is not None:
            exporter.loops.append(SupervisedLoop("forensics", exporter.watch_exits, args.forensics_interval, errors))
        exporter.routes[EXITS_PATH] = exits_route(exits, args.api_max_waiters)
    return exporter


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:
        from exporter.launch import main as launch

        return launch(argv[1:])
    if argv[:1] == ["exits"]:
        from exporter.exits_api import main as exits

        return exits(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=LOG_LEVELS[args.log_level], format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.max_connections < 1:
        parser.error(f"--web.max-connections {args.max_connections}: must be >= 1")
    if args.api_max_waiters < 0:
        parser.error(f"--api.max-waiters {args.api_max_waiters}: must be >= 0 (0 refuses every long poll)")
    if not args.telemetry_path.startswith("/") or args.telemetry_path in ("/", "/healthz"):
        parser.error(f"--web.telemetry-path {args.telemetry_path!r}: must start with / and not be / or /healthz")
    try:
        host, port = parse_listen_address(args.listen)
    except ListenAddressError as exc:
        parser.error(str(exc))

    demo = None
    if args.demo:
        from exporter.demo import DemoNode

        demo = DemoNode.start()
        demo.apply(args)

    errors = ErrorCounter()
    try:
        exporter = build_exporter(args, errors)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        web = load_web_config(args.web_config) if args.web_config else WebConfig()
    except WebConfigError as exc:
        parser.error(str(exc))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter.collector)
    try:
        responder = make_responder(registry, args.telemetry_path, web, routes=exporter.routes)
        server = ExporterServer(responder, host, port, web=web, max_connections=args.max_connections)
    except OSError as exc:
        log.error("cannot listen on %s: %s", args.listen, exc.strerror or exc)
        return 1

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    exporter.start()
    server.start()
    bound_host, bound_port = server.address
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    log.info(
        "gpu-residency-exporter %s listening on %s://%s:%d%s",
        __version__,
        "https" if web.tls else "http",
        shown,
        bound_port,
        args.telemetry_path,
    )
    try:
        stop.wait()
    finally:
        log.info("shutting down")
        server.stop()
        exporter.stop()
        if demo is not None:
            demo.stop()
    return 0
