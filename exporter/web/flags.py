"""--web.* and --api.*: where and how the exporter serves, read by exporter/web."""

from __future__ import annotations

import argparse

from exporter.flags import group, seconds
from exporter.web.server import DEFAULT_MAX_CONNECTIONS, ListenAddressError, parse_listen_address

DEFAULT_LISTEN = ":9852"


def add_flags(parser: argparse.ArgumentParser) -> None:
    web = group(parser, "web")
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
        "--web.telemetry-path",
        dest="telemetry_path",
        default="/metrics",
        metavar="PATH",
        help="path of the metrics (default /metrics)",
    )
    api = group(parser, "JSON API (/api/v1/gpus, /api/v1/wait: fresh readings for gates on other nodes)")
    api.add_argument(
        "--api.max-waiters",
        dest="api_max_waiters",
        type=int,
        default=16,
        metavar="N",
        help="long polls at once on /api/v1/wait, and on /api/v1/exits?wait=; more are answered 429 (default 16 each)",
    )
    seconds(api, "--api.max-wait", "api_max_wait", 60.0, "the longest one long poll lasts (default 60)")
    seconds(
        api,
        "--api.wait-interval",
        "api_wait_interval",
        0.01,
        "how often NVML is read while anyone waits, and only then (default 0.01)",
    )


def listen_address(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, int]:
    """(host, port) to listen on, after the checks argparse cannot make (parser.error on a bad one)."""
    if args.max_connections < 1:
        parser.error(f"--web.max-connections {args.max_connections}: must be >= 1")
    if args.api_max_waiters < 0:
        parser.error(f"--api.max-waiters {args.api_max_waiters}: must be >= 0 (0 refuses every long poll)")
    if not args.telemetry_path.startswith("/") or args.telemetry_path in ("/", "/healthz"):
        parser.error(f"--web.telemetry-path {args.telemetry_path!r}: must start with / and not be / or /healthz")
    try:
        return parse_listen_address(args.listen)
    except ListenAddressError as exc:
        parser.error(str(exc))
