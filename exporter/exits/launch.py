"""`gpu-residency-exporter launch --engine NAME -- CMD...`: run an engine as our child.

Being the parent is the only way to learn a process's real exit status; this mode
registers the child as an engine, forwards the signals a supervisor sends, records the
exit through report_exit, and exits as a shell would (the child's code, or 128+signal).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from exporter.engines.registry import (
    DEFAULT_DIR,
    KINDS,
    REGISTRY_ENV,
    RegistryError,
    register_engine,
    unregister_engine,
)
from exporter.exits.describe import describe_exit
from exporter.exits.report import report_exit

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu-residency-exporter launch",
        description="Run CMD as a registered engine and record how it exits.",
        epilog="example: gpu-residency-exporter launch --engine rollout-0 --url http://127.0.0.1:30000 -- "
        "python -m sglang.launch_server --port 30000",
    )
    parser.add_argument("--engine", required=True, help="engine name (letters, digits, _ . -)")
    parser.add_argument("--url", help="the engine's HTTP base URL, for SGLang accounting")
    parser.add_argument("--kind", default="sglang", choices=KINDS)
    parser.add_argument(
        "--registry.dir", dest="registry_dir", default=os.environ.get(REGISTRY_ENV, DEFAULT_DIR), metavar="DIR"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the engine's command line")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given: put it after --")
    started = time.monotonic()
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        parser.exit(127, f"gpu-residency-exporter launch: cannot run {command[0]!r}: {exc.strerror}\n")
    for signum in FORWARDED:
        signal.signal(signum, lambda received, _frame: child.send_signal(received))
    try:
        register_engine(args.engine, root_pid=child.pid, url=args.url, kind=args.kind, directory=args.registry_dir)
    except (RegistryError, OSError) as exc:
        child.kill()
        child.wait()
        parser.exit(2, f"gpu-residency-exporter launch: cannot register engine: {exc}\n")
    code = child.wait()
    elapsed = time.monotonic() - started
    try:
        report_exit(args.engine, code, elapsed=elapsed, url=args.url, directory=args.registry_dir)
    finally:
        unregister_engine(args.engine, args.registry_dir)
    if code != 0:
        message = describe_exit(code, elapsed, args.url, phase="while running")
        print(f"gpu-residency-exporter launch: engine {args.engine} {message}", file=sys.stderr)
    return 128 - code if code < 0 else code
