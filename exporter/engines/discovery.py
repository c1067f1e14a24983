"""Auto-discovery: engine servers found by their launch command line, named so that two never merge.

A discovered engine is named `<kind>-<port>-<pid>` after its launch process's host PID
(`<kind>-pid<pid>` when it serves on a Unix socket): two servers on one port, in two network
namespaces (pods) or one after another as a restart reuses the port, are two engines and never
one series, and an engine keeps its name for its process's whole life. A framework that wants a
name of its own registers the engine (exporter/engines/registry.py); a registration wins over discovery.

Its URL is polled only where the exporter can reach it. A server on loopback (or every interface)
in another network namespace than the exporter's listens on that namespace's loopback, not ours:
it is measured (its tree's GPU memory) but not polled. The namespace is told by the inode of
/proc/<pid>/net/dev, which differs per network namespace and, unlike /proc/<pid>/ns/net, can be
read without CAP_SYS_PTRACE (the exporter as deployed). Only the --host/--port values of a command
line are kept, nothing else of it.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from exporter.engines.registry import EngineEntry
from exporter.sources.proctable import read_argv, read_proc


@dataclass(frozen=True)
class LaunchRecogniser:
    """How one engine kind's server launch looks on a command line."""

    kind: str
    modules: tuple[str, ...]  # `python -m <module>` launches
    console: str  # the console script, run as `<console> serve ...` (directly or through its interpreter)
    default_port: int
    socket_flag: str | None = None  # a flag that serves on a Unix socket instead of host:port


LAUNCHES = (
    # SGLang: `python -m sglang.launch_server`, `sglang serve`; --host defaults to 127.0.0.1.
    LaunchRecogniser("sglang", ("sglang.launch_server",), "sglang", 30000),
    # vLLM: `vllm serve`, `python -m vllm.entrypoints.openai.api_server`; --host defaults to every
    # interface, --port to 8000, and --uds replaces both.
    LaunchRecogniser("vllm", ("vllm.entrypoints.openai.api_server",), "vllm", 8000, socket_flag="--uds"),
)
DEFAULT_HOST = "127.0.0.1"  # a server listening on every interface is reached on loopback


@dataclass(frozen=True)
class Launch:
    kind: str
    host: str | None  # None with port None: served on a Unix socket, no URL to poll
    port: int | None


def _runs_console(argv: list[str], console: str) -> bool:
    """`<console> serve ...`, or `<python> <path>/<console> serve ...` as the kernel runs a console script."""
    return any(
        len(argv) > index + 1 and os.path.basename(argv[index]) == console and argv[index + 1] == "serve"
        for index in (0, 1)
    )


def _flag_values(argv: list[str], flags: tuple[str, ...]) -> dict[str, str]:
    values = {}
    for position, arg in enumerate(argv):
        for flag in flags:
            if arg == flag and position + 1 < len(argv):
                values[flag] = argv[position + 1]
            elif arg.startswith(flag + "="):
                values[flag] = arg.split("=", 1)[1]
    return values


def parse_launch(argv: list[str]) -> Launch | None:
    """The engine server `argv` launches (kind, host, port), else None.

    Only the --host/--port values are kept, nothing else of the command line."""
    recogniser = next(
        (r for r in LAUNCHES if any(m in argv for m in r.modules) or _runs_console(argv, r.console)), None
    )
    if recogniser is None:
        return None
    flags = ("--host", "--port") + ((recogniser.socket_flag,) if recogniser.socket_flag else ())
    values = _flag_values(argv, flags)
    if recogniser.socket_flag and recogniser.socket_flag in values:
        return Launch(recogniser.kind, None, None)
    port = values.get("--port", str(recogniser.default_port))
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    host = values.get("--host", DEFAULT_HOST)
    if host in ("0.0.0.0", "", "::"):
        host = DEFAULT_HOST  # listening everywhere: reach it on loopback
    return Launch(recogniser.kind, host, int(port))


def _format_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_loopback_or_any(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def net_identity(pid: int | str) -> int | None:
    """Which network namespace `pid` (or "self") is in, as far as /proc tells anyone; None if unreadable."""
    try:
        return os.stat(f"/proc/{pid}/net/dev").st_ino
    except OSError:
        return None


@dataclass(frozen=True)
class Discovered:
    entry: EngineEntry
    start_ticks: int
    url_problem: str | None  # why its URL is not polled from here


def discover_engines(pids: list[int], own_net: int | None) -> list[Discovered]:
    """Engine server launch processes among `pids` (every kind in LAUNCHES); `own_net` is the
    exporter's net_identity("self")."""
    found = []
    for pid in pids:
        launch = parse_launch(read_argv(pid))
        info = read_proc(pid) if launch else None
        if info is None or not info.alive:
            continue
        if launch.port is None:
            entry = EngineEntry(name=f"{launch.kind}-pid{pid}", root_pid=pid, kind=launch.kind)
            found.append(Discovered(entry, info.start_ticks, None))
            continue
        url = _format_url(launch.host, launch.port)
        entry = EngineEntry(name=f"{launch.kind}-{launch.port}-{pid}", root_pid=pid, kind=launch.kind, url=url)
        problem = None
        if is_loopback_or_any(launch.host) and (own_net is None or net_identity(pid) != own_net):
            problem = f"{url} is the loopback of another network namespace than the exporter's (a pod of its own)"
        found.append(Discovered(entry, info.start_ticks, problem))
    return found
