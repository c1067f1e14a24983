"""--registry.dir and --engines.*: where the catalog finds engines, read by exporter/engines."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from exporter.engines.catalog import EngineCatalog
from exporter.engines.registry import DEFAULT_DIR, REGISTRY_ENV
from exporter.engines.static import load_static_config
from exporter.errors import ErrorCounter
from exporter.flags import group, seconds


def add_flags(parser: argparse.ArgumentParser) -> None:
    engines = group(parser, "engines")
    engines.add_argument(
        "--registry.dir",
        dest="registry_dir",
        default=os.environ.get(REGISTRY_ENV, DEFAULT_DIR),
        metavar="DIR",
        help=f"engine registry directory (default ${REGISTRY_ENV} or {DEFAULT_DIR}); a missing directory means "
        "no registered engines",
    )
    engines.add_argument(
        "--engines.config-file",
        dest="engines_config",
        metavar="FILE",
        help="TOML file of fixed engines: [[engines]] name, kind, url, and pid_file or root_pid",
    )
    engines.add_argument(
        "--engines.discover",
        dest="discover",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="find SGLang and vLLM servers by their launch command line (default on)",
    )
    seconds(
        engines,
        "--engines.discovery-interval",
        "discovery_interval",
        10.0,
        "how often discovery scans the process table (default 10)",
    )


def build_catalog(args: argparse.Namespace, errors: ErrorCounter) -> EngineCatalog:
    """The catalog the flags describe; ConfigError for a bad --engines.config-file."""
    static = load_static_config(args.engines_config) if args.engines_config else []
    return EngineCatalog(
        errors,
        registry_dir=Path(args.registry_dir),
        static=static,
        discover=args.discover,
        discovery_interval=args.discovery_interval,
    )
