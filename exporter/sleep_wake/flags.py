"""--engines.release-*, --engines.wake-timeout, --engines.state-*, --engines.residual-window: sleep and wake,
read by exporter/sleep_wake."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path

from exporter.errors import ErrorCounter
from exporter.flags import group, positive_float, seconds
from exporter.sleep_wake.cycles import MAX_WINDOW, MIN_WINDOW, CycleHistory
from exporter.sleep_wake.states import EngineStates, StateObserver
from exporter.sleep_wake.transitions import TransitionTracker
from exporter.snapshot.attribution import Snapshot


def add_flags(parser: argparse.ArgumentParser) -> None:
    states = group(
        parser, "sleep and wake (engines whose framework sets their state, and engines that report it: vLLM)"
    )
    states.add_argument(
        "--engines.release-floor-gb",
        dest="release_floor_gb",
        type=positive_float,
        default=2.0,
        metavar="GIB",
        help="an asleep engine counts as released when it holds less than this on every GPU (default 2); vLLM "
        "sleep levels 1 and 2 both free the weights and KV cache on the GPU and are held to it alike, a level-0 "
        "sleep keeps the weights and is not timed",
    )
    seconds(
        states,
        "--engines.release-timeout",
        "release_timeout",
        60.0,
        "a release not complete after this is counted as a timeout and its holders logged (default 60)",
    )
    seconds(
        states,
        "--engines.wake-timeout",
        "wake_timeout",
        300.0,
        "likewise for residency coming back after the engine is marked active (default 300)",
    )
    seconds(
        states,
        "--engines.state-mismatch-grace",
        "mismatch_grace",
        15.0,
        "a framework-set state and the engine's own report may disagree this long (the poll lags the call) before "
        "it counts as a mismatch (default 15)",
    )
    seconds(
        states,
        "--engines.state-interval",
        "state_interval",
        0.25,
        "how often a release or wake in progress is measured, between scrapes; with none in progress nothing is "
        "(default 0.25)",
    )
    states.add_argument(
        "--engines.residual-window",
        dest="residual_window",
        type=cycle_count,
        default=10,
        metavar="CYCLES",
        help=f"the growth of what each release leaves behind is the trend over this many completed releases "
        f"({MIN_WINDOW} to {MAX_WINDOW}; default 10)",
    )


def cycle_count(text: str) -> int:
    """A whole number of cycles in [MIN_WINDOW, MAX_WINDOW]: fewer lets +-50 MiB of noise pass for growth."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not MIN_WINDOW <= value <= MAX_WINDOW:
        raise argparse.ArgumentTypeError(f"{text!r} must be from {MIN_WINDOW} to {MAX_WINDOW}")
    return value


def build_cycles(args: argparse.Namespace, errors: ErrorCounter) -> CycleHistory:
    """The post-release residual history, kept in --state.dir beside the exit counts."""
    state_dir = Path(args.state_dir) if args.state_dir else None
    return CycleHistory(args.node, _floor_bytes(args), args.residual_window, state_dir, errors)


def _floor_bytes(args: argparse.Namespace) -> int:
    return int(args.release_floor_gb * 1024**3)


def build_transitions(
    args: argparse.Namespace,
    observers: Iterable[StateObserver],
    on_release: Callable[[str, dict[str, int], Snapshot, float], None] | None = None,
) -> TransitionTracker:
    """The tracker of releases and wakes, over the states the framework sets and `observers` report;
    `on_release` is told what each completed release left behind."""
    states = EngineStates(args.node, observers=observers, grace=args.mismatch_grace)
    return TransitionTracker(
        args.node, _floor_bytes(args), args.release_timeout, args.wake_timeout, states, on_release=on_release
    )
