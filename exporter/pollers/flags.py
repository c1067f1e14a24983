"""--sglang.*, --vllm.* and --engines.allowed-hosts: how engines are polled, read by exporter/pollers."""

from __future__ import annotations

import argparse

from exporter.engines.catalog import EngineCatalog
from exporter.errors import ErrorCounter
from exporter.flags import group, seconds
from exporter.pollers.sglang import SglangPoller
from exporter.pollers.url_policy import UrlPolicy
from exporter.pollers.vllm import VllmPoller


def add_flags(parser: argparse.ArgumentParser) -> None:
    engines = group(parser, "engines")
    sglang = group(parser, "sglang accounting and exits")
    seconds(
        sglang,
        "--sglang.poll-interval",
        "sglang_interval",
        15.0,
        "how often each SGLang engine's /server_info is polled, in the background (default 15; failures back "
        "off up to 300)",
    )
    seconds(
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
    vllm = group(parser, "vllm (the engine's own sleep state and KV-cache accounting)")
    seconds(
        vllm,
        "--vllm.poll-interval",
        "vllm_interval",
        2.0,
        "how often each vLLM engine's /metrics (and /is_sleeping, on releases before 0.11.1) is polled, in the "
        "background; an observed sleep or wake is timed from the poll that saw it (default 2; failures back off "
        "up to 300)",
    )
    seconds(
        vllm,
        "--vllm.timeout",
        "vllm_timeout",
        3.0,
        "read timeout of one poll, beyond the 1 s to connect; every request of a poll shares it (default 3)",
    )


ENGINES_MAX_AGE = 30.0  # seconds a poller takes the catalog's last resolution as current


def build_pollers(
    args: argparse.Namespace, errors: ErrorCounter, catalog: EngineCatalog
) -> tuple[SglangPoller, VllmPoller]:
    """The SGLang and vLLM pollers, each reading the catalog's engines and the same URL policy."""
    allowed = [item.strip() for item in args.engines_allowed.split(",") if item.strip()]

    def poller(kind: type[SglangPoller] | type[VllmPoller], interval: float, timeout: float, max_age: float):
        return kind(
            args.node,
            errors,
            UrlPolicy.default(allowed),
            interval=interval,
            read_timeout=timeout,
            engines=lambda: catalog.current(max_age=max_age),
        )

    # The engines as last resolved: the watcher resolves again at every registry change, discovery
    # find and death (exporter/watcher.py), so a poller need not read /proc on its own every few seconds.
    sglang = poller(SglangPoller, args.sglang_interval, args.sglang_timeout, ENGINES_MAX_AGE)
    vllm = poller(VllmPoller, args.vllm_interval, args.vllm_timeout, ENGINES_MAX_AGE)
    return sglang, vllm
