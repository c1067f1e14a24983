"""--collector.* and --collection.min-interval: which concerns a scrape collects and how often the
shared snapshot is rebuilt, read by exporter/collectors and exporter/snapshot."""

from __future__ import annotations

import argparse

from exporter.flags import group, seconds

COLLECTORS = {
    "gpu": "whole-GPU used, total and reserved memory",
    "processes": "per-process, per-engine and unattributed memory, engine_up",
    "sglang": "SGLang /server_info accounting",
    "vllm": "vLLM sleep level and KV-cache accounting",
    "exits": "engine exits",
    "sleep_wake": "engine state (framework-set or observed), mismatches, release and wake timing",
    "cycles": "what each completed release leaves behind, per cycle, and its growth",
    "gate": "the gate's last decision per engine",
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    seconds(
        group(parser, "web"),  # where --help has always listed it, beside the other serving flags
        "--collection.min-interval",
        "min_interval",
        0.25,
        "scrapes this close to the last collection reuse it (default 0.25; 0 collects on every scrape); "
        "concurrent scrapes always share one",
        zero=True,
    )
    collectors = group(
        parser, "collectors", "each concern is collected in isolation; a failing one loses only its own series"
    )
    for name, help_text in COLLECTORS.items():
        collectors.add_argument(
            f"--collector.{name}",
            dest=f"collector_{name}",
            action=argparse.BooleanOptionalAction,
            default=True,
            help=f"{help_text} (default on)",
        )


def disabled(args: argparse.Namespace) -> list[str]:
    """The concerns turned off with --no-collector.NAME."""
    return [name for name in COLLECTORS if not getattr(args, f"collector_{name}")]
