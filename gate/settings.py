"""The gate's settings: environment variables, defaults, and how a bad value is refused."""

from __future__ import annotations

import os

THRESHOLD_ENV = "GPU_RESIDENCY_GATE_THRESHOLD_GB"
LEGACY_THRESHOLD_ENV = "MILES_MAX_RESIDUAL_GPU_MEM_GB"  # honoured for drop-in use
SOURCE_ENV = "GPU_RESIDENCY_GATE_SOURCE"
PROMETHEUS_ENV = "GPU_RESIDENCY_PROMETHEUS_URL"
# Label matchers every Prometheus query adds (cluster="a"): one cluster's series behind a global Querier.
SELECTOR_ENV = "GPU_RESIDENCY_PROMETHEUS_SELECTOR"
EXPORTER_ENV = "GPU_RESIDENCY_EXPORTER_URL"  # the node's exporter, for the exporter source
MAX_AGE_ENV = "GPU_RESIDENCY_GATE_MAX_AGE_S"
FAIL_OPEN_ENV = "GPU_RESIDENCY_GATE_FAIL_OPEN"
CLEAR_SAMPLES_ENV = "GPU_RESIDENCY_GATE_CLEAR_SAMPLES"
REGISTRY_ENV = "GPU_RESIDENCY_REGISTRY"  # where the gate records its decisions for the exporter
DEFAULT_THRESHOLD_GB = 2.0
DEFAULT_MAX_AGE_S = 15.0
# A wait's pace (see _Pace): looks this often while close to clearing, for this long after the
# wait starts, within this much of the threshold; a fall of this much since the last look counts
# as a release under way.
DEFAULT_FAST_POLL_S = 0.005
DEFAULT_EAGER_S = 5.0
DEFAULT_NEAR_GB = 2.0
FALLING_BYTES = 256 * 1024**2
STREAK_SLACK_S = 0.001  # a clear look poll_s after the last one counts even if the clock reads a hair less
LONG_POLL_S = 5.0  # the longest one long poll of a wait lasts
SOURCES = ("auto", "exporter", "nvml", "prometheus", "nvidia-smi")


class GateConfigError(ValueError):
    """A threshold, source or option that cannot work; raised at construction, not mid-wait."""


def parse_threshold(value: object, where: str) -> float:
    """GiB > 0, as RLix's own parser demands ('must be a number', 'must be > 0')."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise GateConfigError(f"{where}={value!r} must be a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise GateConfigError(f"{where}={value!r} must be a number")
    if number <= 0:
        raise GateConfigError(f"{where}={value!r} must be > 0")
    return number


def env_number(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise GateConfigError(f"{name}={raw!r} must be a number") from None
    if not value > minimum:
        raise GateConfigError(f"{name}={raw!r} must be > {minimum:g}")
    return value


def default_node() -> str:
    return os.environ.get("NODE_NAME") or os.uname().nodename  # = gethostname(), without importing socket


def threshold_from_env() -> float | None:
    """GiB from $GPU_RESIDENCY_GATE_THRESHOLD_GB, else $MILES_MAX_RESIDUAL_GPU_MEM_GB (drop-in use),
    parsed as RLix does; None when neither is set."""
    for name in (THRESHOLD_ENV, LEGACY_THRESHOLD_ENV):
        if os.environ.get(name, "") != "":
            return parse_threshold(os.environ[name], name)
    return None
