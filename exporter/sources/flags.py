"""--nvml.*: how NVML is loaded and how long a read may take, read by exporter/sources/nvml.py."""

from __future__ import annotations

import argparse

from exporter.errors import ErrorCounter
from exporter.flags import group, seconds
from exporter.sources.nvml import DEFAULT_TIMEOUT_SECONDS as DEFAULT_NVML_TIMEOUT
from exporter.sources.nvml import NvmlSource


def add_flags(parser: argparse.ArgumentParser) -> None:
    nvml = group(parser, "nvml")
    nvml.add_argument(
        "--nvml.library",
        dest="nvml_library",
        metavar="PATH",
        help="load libnvidia-ml from this path instead of the loader's search path",
    )
    seconds(
        nvml,
        "--nvml.timeout",
        "nvml_timeout",
        DEFAULT_NVML_TIMEOUT,
        f"a collection's NVML reads must finish within this, or it reports nvml_up 0 (a hung GPU or driver) "
        f"(default {DEFAULT_NVML_TIMEOUT:g})",
    )


def build_nvml(args: argparse.Namespace, errors: ErrorCounter) -> NvmlSource:
    return NvmlSource(errors, library_path=args.nvml_library, timeout=args.nvml_timeout)
