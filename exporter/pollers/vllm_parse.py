"""Parsing what vLLM says about itself: /metrics (sleep state, KV-cache accounting) and the older
/is_sleeping; see exporter/pollers/vllm.py for what each release sends and what it means."""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from gpu_residency_common.files import parse_json_as

SLEEP_STATE = "vllm:engine_sleep_state"
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


@dataclass(frozen=True)
class SleepReport:
    sleeping: bool
    level: int | None  # 0, 1, 2 while asleep, where the engine says; None otherwise


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


def parse_metrics(body: bytes | str) -> tuple[tuple[RankAccounting, ...], SleepReport | None]:
    """Accounting per DP engine and the sleep state (None when /metrics does not carry it) from
    a vLLM /metrics body; ValueError when it does not parse, ShapeError when it is not vLLM's."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    sleep: dict[str, dict[str, float]] = {}
    usage: dict[str, dict[str, float]] = {}  # family -> rank -> value
    config: dict[str, dict[str, str]] = {}
    try:
        for family in text_string_to_metric_families(text):
            if family.name == SLEEP_STATE:
                for sample in family.samples:
                    state = sample.labels.get("sleep_state", "")
                    if state in ("awake", *LEVELS):
                        sleep.setdefault(_rank(sample.labels), {}).setdefault(state, sample.value)
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
    ranks = set(sleep) | set(config) | {rank for values in usage.values() for rank in values}
    if len(ranks) > MAX_RANKS:
        raise ShapeError(f"{len(ranks)} engines in one server (at most {MAX_RANKS} are read)")
    accounting = []
    for rank in sorted(ranks, key=int):
        ratio = next((usage[name][rank] for name in KV_USAGE if rank in usage.get(name, {})), None)
        labels = config.get(rank, {})
        accounting.append(
            RankAccounting(
                rank,
                kv_usage=ratio if ratio is not None and math.isfinite(ratio) and 0 <= ratio <= 1 else None,
                blocks=_count(labels.get("num_gpu_blocks")),
                block_size=_count(labels.get("block_size")),
                tokens=_count(labels.get("kv_cache_size_tokens")),
            )
        )
    return tuple(accounting), _server_sleep([_rank_sleep(rank, values) for rank, values in sorted(sleep.items())])


def _server_sleep(reports: list[SleepReport]) -> SleepReport | None:
    """The server asleep when every engine is (vLLM sleeps them together); else awake: some engine holds on."""
    if not reports:
        return None
    if all(report.sleeping for report in reports):
        return SleepReport(True, min(report.level for report in reports))
    return SleepReport(False, None)


def parse_is_sleeping(body: bytes | str) -> SleepReport:
    """`{"is_sleeping": true|false}`: ValueError when it is not JSON, ShapeError when not that shape."""
    data = parse_json_as(ValueError, body)
    if not isinstance(data, dict) or not isinstance(data.get("is_sleeping"), bool):
        raise ShapeError('not {"is_sleeping": true|false}')
    return SleepReport(data["is_sleeping"], None)
