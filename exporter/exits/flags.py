"""--exits.*, --state.dir and --forensics.*: how exits are counted and explained, read by exporter/exits."""

from __future__ import annotations

import argparse
from pathlib import Path

from exporter.errors import ErrorCounter
from exporter.exits.causes import CHILD_WINDOW_SECONDS
from exporter.exits.forensics import DEFAULT_TREE_INTERVAL, DEFAULT_WINDOW_SECONDS, Forensics
from exporter.exits.log import ExitLog
from exporter.flags import group, seconds

DEFAULT_STATE_DIR = "/var/lib/gpu-residency"


def add_flags(parser: argparse.ArgumentParser) -> None:
    sglang = group(parser, "sglang accounting and exits")
    seconds(
        sglang,
        "--exits.grace-period",
        "exit_grace",
        30.0,
        "how long a registered engine's root may be gone before an exit nobody reported is counted as "
        'exit_code="unknown" (default 30)',
    )
    seconds(
        sglang,
        "--exits.first-zero-seconds",
        "exit_first_zero",
        60.0,
        "a new exit series is published at 0 for this long first, so increase() and the exit alerts see "
        "an engine's first exit; keep it above your scrape interval (default 60)",
        zero=True,
    )
    seconds(
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
    forensics = group(
        parser, "crash forensics", "why an engine died (an OOM kill, a child's failure) and what was on its GPUs"
    )
    seconds(
        forensics,
        "--forensics.interval",
        "forensics_interval",
        1.0,
        "how often, while engines live and no scrape read NVML for 1.5 of these, their GPUs' used memory is read "
        "(process lists too when it changed) for the peak before a death; deaths themselves are heard at once (a "
        "pidfd per process), the kernel log and OOM counters read then (default 1; 0 turns forensics off: "
        "causes are then from exit codes only)",
        zero=True,
    )
    seconds(
        forensics,
        "--forensics.tree-interval",
        "forensics_tree_interval",
        DEFAULT_TREE_INTERVAL,
        "how often, while engines live, the whole process table is read for children of their trees that never "
        "touch a GPU, and the engines resolved again; a new engine, or a new GPU process in a tree, has its tree "
        f"read at once (default {DEFAULT_TREE_INTERVAL:g})",
    )
    seconds(
        forensics,
        "--forensics.window",
        "forensics_window",
        DEFAULT_WINDOW_SECONDS,
        f"how far back before a death the GPU peak and its holders are looked for (default {DEFAULT_WINDOW_SECONDS:g})",
    )
    seconds(
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


def build_exit_log(args: argparse.Namespace, errors: ErrorCounter) -> tuple[ExitLog, Forensics | None]:
    """The exit log, and its crash forensics unless --forensics.interval 0 turned them off."""
    forensics = None
    if args.forensics_interval > 0:
        forensics = Forensics(
            args.node,
            errors,
            window_seconds=args.forensics_window,
            child_window=args.forensics_child_window,
            cgroup_root=Path(args.forensics_cgroup_root),
            kmsg=args.forensics_kmsg or None,
            tree_interval=args.forensics_tree_interval,
        )
    exits = ExitLog(
        args.node,
        Path(args.registry_dir),
        errors,
        grace_seconds=args.exit_grace,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        first_zero_seconds=args.exit_first_zero,
        retention_seconds=args.exit_retention,
        forensics=forensics,
    )
    return exits, forensics
