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


def build_pollers(
    args: argparse.Namespace, errors: ErrorCounter, catalog: EngineCatalog
) -> tuple[SglangPoller, VllmPoller]:
    """The SGLang and vLLM pollers, each reading the catalog's engines and the same URL policy."""
    allowed = [item.strip() for item in args.engines_allowed.split(",") if item.strip()]

    def poller(kind: type[SglangPoller] | type[VllmPoller], interval: float, timeout: float):
        made = kind(args.node, errors, UrlPolicy.default(allowed), interval=interval, read_timeout=timeout)
        # Every resolution of the catalog (each collection: a scrape, or the watcher at a registry change,
        # a discovery find, a death) tells the poller its engines: it never reads /proc or wakes to ask.
        catalog.listeners.append(made.track)
        return made

    return (
        poller(SglangPoller, args.sglang_interval, args.sglang_timeout),
        poller(VllmPoller, args.vllm_interval, args.vllm_timeout),
    )
