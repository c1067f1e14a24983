"""One exporter process, wired: the shared snapshot and the collector over it, the background
pollers and loops, and the routes beside /metrics. Each piece is built by its own package from
the flags it declared (exporter/*/flags.py); this module only connects them."""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field
from pathlib import Path

from exporter.collectors.assembly import ResidencyCollector
from exporter.collectors.flags import disabled as disabled_collectors
from exporter.engines.catalog import EngineCatalog
from exporter.engines.flags import build_catalog
from exporter.errors import ErrorCounter
from exporter.exits.flags import build_exit_log
from exporter.exits.forensics import Forensics
from exporter.exits.log import ExitLog
from exporter.exits.report import EXITS_PATH
from exporter.pollers.flags import build_pollers
from exporter.pollers.sglang import SglangPoller
from exporter.pollers.vllm import VllmPoller
from exporter.sleep_wake.cycles import CycleHistory
from exporter.sleep_wake.flags import build_cycles, build_transitions
from exporter.sleep_wake.gate_records import GateRecords
from exporter.sleep_wake.transitions import TransitionTracker
from exporter.sources.flags import build_nvml
from exporter.sources.nvml import NvmlSource
from exporter.watcher import Watcher
from exporter.web.exits_api import exits_route
from exporter.web.gpus_api import GpuApi
from exporter.web.server import Route


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
    watcher: Watcher | None = None
    routes: dict[str, Route] = field(default_factory=dict)

    def start(self) -> None:
        self.catalog.start()
        self.poller.start()
        if self.vllm is not None:
            self.vllm.start()
        if self.watcher is not None:
            self.watcher.start()

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.vllm is not None:
            self.vllm.stop()
        self.poller.stop()
        self.catalog.stop()


def build_exporter(args: argparse.Namespace, errors: ErrorCounter) -> Exporter:
    """Every piece from the parsed flags; ConfigError for a bad --engines.config-file."""
    catalog = build_catalog(args, errors)
    poller, vllm = build_pollers(args, errors, catalog)
    exits, forensics = build_exit_log(args, errors)
    cycles = build_cycles(args, errors)
    transitions = build_transitions(args, observers=[vllm], on_release=cycles.record)
    gate_records = GateRecords(args.node, Path(args.registry_dir), errors)
    nvml = build_nvml(args, errors)
    concerns = [
        ("sglang", poller.families),
        ("vllm", vllm.families),
        ("exits", exits.families),
        ("sleep_wake", transitions.families),
        ("cycles", cycles.families),
        ("gate", gate_records.families),
    ]
    disabled = disabled_collectors(args)
    collector = ResidencyCollector(
        args.node,
        nvml,
        catalog,
        errors,
        concerns=concerns,
        min_interval=args.min_interval,
        disabled=disabled,
        observers=[lambda snapshot: forensics.record(snapshot.nvml, snapshot.taken_at)] if forensics else [],
    )
    exporter = Exporter(collector, catalog, poller, transitions, exits, vllm, forensics, nvml)
    # The JSON API for gates on other nodes: the collector's NVML source serves its long poll.
    exporter.routes.update(
        GpuApi(
            args.node,
            collector.shared,
            nvml,
            errors,
            max_waiters=args.api_max_waiters,
            max_wait=args.api_max_wait,
            interval=args.api_wait_interval,
            notes=functools.partial(_engine_notes, cycles, vllm),
        ).routes()
    )
    if "exits" not in disabled:
        exporter.routes[EXITS_PATH] = exits_route(exits, args.api_max_waiters)
    if not {"sleep_wake", "exits"} <= set(disabled):
        exporter.watcher = Watcher(
            collector,
            catalog,
            nvml,
            errors,
            Path(args.registry_dir),
            transitions=None if "sleep_wake" in disabled else transitions,
            exits=None if "exits" in disabled else exits,
            forensics=None if "exits" in disabled else forensics,
            state_interval=args.state_interval,
            history_interval=args.forensics_interval or args.state_interval,
            refresh_interval=args.forensics_tree_interval,
        )
    return exporter


def _engine_notes(cycles: CycleHistory, vllm: VllmPoller | None, engine: str, uuid: str) -> dict:
    """The JSON API's fields beside an engine's memory on a GPU: its creep, and the resources its own
    report cannot say were released (the gate names both)."""
    notes: dict = {}
    growth = cycles.growth(engine, uuid)
    if growth is not None:
        notes["residual_growth_bytes_per_cycle"] = growth
    unknown = vllm.unknown_resources(engine) if vllm is not None else ()
    if unknown:
        notes["unknown_resources"] = list(unknown)
    return notes
