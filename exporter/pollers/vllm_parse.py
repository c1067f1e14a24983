"""Parsing what vLLM says about itself: /metrics (sleep state per resource or as one level, sleep-mode
operation timings, KV-cache accounting) and the older /is_sleeping; see exporter/pollers/vllm.py for
what each release sends and what it means."""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from gpu_residency_common.files import parse_json_as

SLEEP_STATE = "vllm:engine_sleep_state"
RESOURCE_STATE = "vllm:engine_sleep_resource_state"
FULLY_AWAKE = "vllm:engine_fully_awake"
# Each resource's states as vLLM names them; `unknown` after a failed sleep or wake RPC.
RESOURCES = {
    "scheduler": ("running", "paused"),
    "weights": ("resident", "offloaded", "discarded", "unknown"),
    "kv_cache": ("resident", "released", "unknown"),
}
# The operation timings, the current name first (vLLM renamed them with an rl_ prefix).
DURATION = ("vllm:rl_sleep_mode_operation_duration_seconds", "vllm:sleep_mode_operation_duration_seconds")
IN_FLIGHT = ("vllm:rl_sleep_mode_operations_in_flight", "vllm:sleep_mode_operations_in_flight")
OPERATIONS = ("sleep", "wake", "release_kv_cache_memory")
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # the current name first
CACHE_CONFIG = "vllm:cache_config_info"
MAX_RANKS = 64  # more data-parallel engines than this in one server is not a vLLM we understand
LEVELS = {"weights_offloaded": 1, "discard_all": 2}


class ShapeError(ValueError):
    """The body parses but is not what vLLM sends (a sleep state that is not 0/1, a rank that is no index)."""


@dataclass(frozen=True)
class RankAccounting:
    dp_rank: str  # vLLM's `engine` label: the data-parallel engine index
    kv_usage: float | None = None  # 0..1
    blocks: int | None = None
    block_size: int | None = None
    tokens: int | None = None
    resources: tuple[tuple[str, str], ...] = ()  # (resource, state), sorted; vLLM's per-resource sleep state
    fully_awake: bool | None = None  # vllm:engine_fully_awake


@dataclass(frozen=True)
class SleepReport:
    sleeping: bool
    level: int | None  # 0, 1, 2 while asleep, where the engine says; None otherwise
    unknown: tuple[str, ...] = ()  # resources vLLM cannot vouch for (a failed sleep or wake): not released


@dataclass(frozen=True)
class Timing:
    """One operation's duration histogram as vLLM publishes it (cumulative since the server started)."""

    buckets: tuple[tuple[str, float], ...]  # (le, cumulative count), "+Inf" last
    count: float
    sum: float


@dataclass(frozen=True)
class MetricsReport:
    ranks: tuple[RankAccounting, ...]
    sleep: SleepReport | None  # None when /metrics does not carry the sleep state
    timings: dict[str, Timing]  # operation -> its histogram
    in_flight: dict[str, float]  # operation -> operations awaited now


def _rank(labels: dict[str, str]) -> str:
    rank = labels.get("engine", "0")
    if not rank.isdigit() or len(rank) > 4:
        raise ShapeError(f"engine label {rank[:20]!r} is not an engine index")
    return str(int(rank))


def _count(text: str | None) -> int | None:
    """A label value that is a count ("24978"); None for "None", "" and anything else."""
    if text is None or not text.isdigit() or len(text) > 15:
        return None
    return int(text)


def _rank_sleep(rank: str, values: dict[str, float]) -> SleepReport:
    if "awake" not in values:
        raise ShapeError(f"{SLEEP_STATE} of engine {rank} has no awake series")
    for state, value in values.items():
        if value not in (0.0, 1.0):
            raise ShapeError(f"{SLEEP_STATE}{{sleep_state={state!r}}} of engine {rank} is {value}, not 0 or 1")
    levels = [level for state, level in LEVELS.items() if values.get(state) == 1.0]
    if values["awake"] == 1.0:
        if levels:
            raise ShapeError(f"{SLEEP_STATE} of engine {rank} says awake and asleep at once")
        return SleepReport(False, None)
    if len(levels) > 1:
        raise ShapeError(f"{SLEEP_STATE} of engine {rank} says two sleep levels at once")
    return SleepReport(True, levels[0] if levels else 0)


def _resource_sleep(rank: str, states: dict[str, str], fully_awake: float | None) -> SleepReport:
    """A rank's sleep from its resources: awake only when fully so; the level from the weights
    (offloaded 1, discarded 2, resident 0: a pause, a KV-only release or a partial wake); a
    resource in `unknown` makes it asleep at no level, its memory not known to be released."""
    unknown = tuple(sorted(name for name, state in states.items() if state == "unknown"))
    if unknown:
        return SleepReport(True, None, unknown)
    if fully_awake is None:  # the flag is vLLM's own predicate over the same snapshot; without it, the same test
        fully_awake = float(all(states.get(name) in ("resident", "running") for name in RESOURCES))
    if fully_awake == 1.0:
        return SleepReport(False, None)
    return SleepReport(True, {"offloaded": 1, "discarded": 2}.get(states.get("weights", ""), 0))


def _one_state(rank: str, resource: str, values: dict[str, float]) -> str | None:
    for state, value in values.items():
        if value not in (0.0, 1.0):
            raise ShapeError(f"{RESOURCE_STATE}{{resource={resource!r},state={state!r}}} of engine {rank} is {value}")
    current = [state for state, value in values.items() if value == 1.0]
    if len(current) > 1:
        raise ShapeError(f"{RESOURCE_STATE} of engine {rank} says {resource} is {' and '.join(current)} at once")
    return current[0] if current else None


def _bound(le: str) -> float | None:
    try:
        return float(le)
    except ValueError:
        return None


def _timing(samples: list) -> Timing | None:
    """A histogram's samples for one operation; None when they do not make one (that operation's
    timing is then absent, the rest of the body still read)."""
    bounds = [
        (_bound(s.labels.get("le", "")), s.labels.get("le", ""), s.value) for s in samples if s.name.endswith("_bucket")
    ]
    if not bounds or any(bound is None or math.isnan(bound) for bound, _, _ in bounds):
        return None
    buckets = tuple((le, value) for _, le, value in sorted(bounds, key=lambda item: item[0]))
    count = next((s.value for s in samples if s.name.endswith("_count")), None)
    total = next((s.value for s in samples if s.name.endswith("_sum")), None)
    if count is None or total is None or buckets[-1][0] != "+Inf":
        return None
    if not all(math.isfinite(v) and v >= 0 for v in [count, total, *(value for _, value in buckets)]):
        return None
    return Timing(buckets, count, total)


def parse_metrics(body: bytes | str) -> MetricsReport:
    """Accounting per DP engine, the sleep state (None when /metrics does not carry it) and the
    sleep-mode operation timings from a vLLM /metrics body; ValueError when it does not parse,
    ShapeError when it is not vLLM's. The per-resource state, where published, decides the sleep
    state; the older engine_sleep_state otherwise."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    sleep: dict[str, dict[str, float]] = {}
    resources: dict[str, dict[str, dict[str, float]]] = {}  # rank -> resource -> state -> value
    awake: dict[str, float] = {}
    usage: dict[str, dict[str, float]] = {}  # family -> rank -> value
    config: dict[str, dict[str, str]] = {}
    histograms: dict[str, dict[str, list]] = {}  # family -> operation -> samples
    in_flight: dict[str, dict[str, float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            if family.name == SLEEP_STATE:
                for sample in family.samples:
                    state = sample.labels.get("sleep_state", "")
                    if state in ("awake", *LEVELS):
                        sleep.setdefault(_rank(sample.labels), {}).setdefault(state, sample.value)
            elif family.name == RESOURCE_STATE:
                for sample in family.samples:
                    resource, state = sample.labels.get("resource", ""), sample.labels.get("state", "")
                    if state in RESOURCES.get(resource, ()):
                        by_resource = resources.setdefault(_rank(sample.labels), {})
                        by_resource.setdefault(resource, {}).setdefault(state, sample.value)
            elif family.name == FULLY_AWAKE:
                for sample in family.samples:
                    awake.setdefault(_rank(sample.labels), sample.value)
            elif family.name in DURATION:
                for sample in family.samples:
                    operation = sample.labels.get("operation", "")
                    if operation in OPERATIONS:
                        histograms.setdefault(family.name, {}).setdefault(operation, []).append(sample)
            elif family.name in IN_FLIGHT:
                for sample in family.samples:
                    operation = sample.labels.get("operation", "")
                    if operation in OPERATIONS and math.isfinite(sample.value) and sample.value >= 0:
                        in_flight.setdefault(family.name, {}).setdefault(operation, sample.value)
            elif family.name in KV_USAGE:
                for sample in family.samples:
                    usage.setdefault(family.name, {}).setdefault(_rank(sample.labels), sample.value)
            elif family.name == CACHE_CONFIG:
                for sample in family.samples:
                    config.setdefault(_rank(sample.labels), sample.labels)
    except ShapeError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a Prometheus text exposition: {exc}") from None
    ranks = set(sleep) | set(config) | set(resources) | set(awake) | {r for v in usage.values() for r in v}
    if len(ranks) > MAX_RANKS:
        raise ShapeError(f"{len(ranks)} engines in one server (at most {MAX_RANKS} are read)")
    states = {
        rank: {name: state for name, values in by_resource.items() if (state := _one_state(rank, name, values))}
        for rank, by_resource in resources.items()
    }
    accounting = []
    for rank in sorted(ranks, key=int):
        ratio = next((usage[name][rank] for name in KV_USAGE if rank in usage.get(name, {})), None)
        labels = config.get(rank, {})
        flag = awake.get(rank)
        accounting.append(
            RankAccounting(
                rank,
                kv_usage=ratio if ratio is not None and math.isfinite(ratio) and 0 <= ratio <= 1 else None,
                blocks=_count(labels.get("num_gpu_blocks")),
                block_size=_count(labels.get("block_size")),
                tokens=_count(labels.get("kv_cache_size_tokens")),
                resources=tuple(sorted(states.get(rank, {}).items())),
                fully_awake=None if flag not in (0.0, 1.0) else flag == 1.0,
            )
        )
    if any(states.values()):
        reports = [_resource_sleep(rank, states[rank], awake.get(rank)) for rank in sorted(states) if states[rank]]
    else:
        reports = [_rank_sleep(rank, values) for rank, values in sorted(sleep.items())]
    name = next((name for name in DURATION if name in histograms), None)
    timings = {op: t for op, samples in histograms.get(name or "", {}).items() if (t := _timing(samples))}
    flight = next((in_flight[name] for name in IN_FLIGHT if name in in_flight), {})
    return MetricsReport(tuple(accounting), _server_sleep(reports), timings, flight)


def _server_sleep(reports: list[SleepReport]) -> SleepReport | None:
    """The server asleep when every engine is (vLLM sleeps them together); else awake: some engine
    holds on. An engine in an unknown state makes the server's state unknown: asleep, no level."""
    if not reports:
        return None
    unknown = tuple(sorted({name for report in reports for name in report.unknown}))
    if unknown:
        return SleepReport(True, None, unknown)
    if all(report.sleeping for report in reports):
        return SleepReport(True, min(report.level or 0 for report in reports))
    return SleepReport(False, None)


def parse_is_sleeping(body: bytes | str) -> SleepReport:
    """`{"is_sleeping": true|false}`: ValueError when it is not JSON, ShapeError when not that shape."""
    data = parse_json_as(ValueError, body)
    if not isinstance(data, dict) or not isinstance(data.get("is_sleeping"), bool):
        raise ShapeError('not {"is_sleeping": true|false}')
    return SleepReport(data["is_sleeping"], None)
