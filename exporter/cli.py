"""`gpu-residency-exporter`: serve the node's GPU residency to Prometheus."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading

from prometheus_client import CollectorRegistry

from exporter import __version__
from exporter.collectors import flags as collector_flags
from exporter.engines import flags as engine_flags
from exporter.engines.static import ConfigError
from exporter.errors import ErrorCounter
from exporter.exits import flags as exit_flags
from exporter.pollers import flags as poller_flags
from exporter.runtime import build_exporter
from exporter.sleep_wake import flags as sleep_wake_flags
from exporter.sources import flags as source_flags
from exporter.web import flags as web_flags
from exporter.web.config import WebConfig, WebConfigError, load_web_config
from exporter.web.server import ExporterServer, make_responder

log = logging.getLogger("exporter")

# Each package declares the flags it reads; the order here is the order of --help's groups.
FLAG_OWNERS = (web_flags, engine_flags, poller_flags, exit_flags, sleep_wake_flags, source_flags, collector_flags)
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
    for owner in FLAG_OWNERS:
        owner.add_flags(parser)
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:
        from exporter.exits.launch import main as launch

        return launch(argv[1:])
    if argv[:1] == ["exits"]:
        from exporter.exits.command import main as exits

        return exits(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=LOG_LEVELS[args.log_level], format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    host, port = web_flags.listen_address(parser, args)

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
