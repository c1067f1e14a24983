"""SGLang's start-up accounting from its /metrics (newer releases, with --enable-metrics), for engines
whose /server_info is absent or slow.

Each scheduler (one per GPU) publishes, set once at start-up, in GiB:
`sglang:weight_memory_usage_gb`, `sglang:kv_cache_memory_usage_gb`,
`sglang:graph_memory_usage_gb{phase}` (one series per CUDA-graph phase, as /server_info's
per-phase `graph` dict), `sglang:startup_available_gpu_memory_gb` and the token capacity
`sglang:max_total_num_tokens`, labelled `model_name`, `engine_type`, `tp_rank`, `pp_rank`,
`moe_ep_rank` and, with DP attention, `dp_rank`. /server_info reports one scheduler per DP rank
(its first); the same is read here: per `dp_rank` (0 when absent), the scheduler with the lowest
(`tp_rank`, `pp_rank`). A figure that is not a finite non-negative number yields no series.
"""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from exporter.pollers.sglang_parse import GIB, RankAccounting, ShapeError

FAMILIES = {
    "sglang:weight_memory_usage_gb": "weight",
    "sglang:kv_cache_memory_usage_gb": "kvcache",
    "sglang:graph_memory_usage_gb": "graph",
    "sglang:startup_available_gpu_memory_gb": "startup_available",
    "sglang:max_total_num_tokens": "token_capacity",
}
MAX_RANKS = 256


def _index(labels: dict[str, str], name: str) -> int:
    value = labels.get(name, "0")
    if not value.isdigit() or len(value) > 5:
        raise ShapeError(f"{name} label {value[:20]!r} is not a rank")
    return int(value)


def parse_metrics(body: bytes | str) -> tuple[RankAccounting, ...] | None:
    """Accounting per DP rank from an SGLang /metrics body; None when it has no memory gauges
    (metrics of an older release). ValueError when it does not parse, ShapeError for a rank
    label that is no index."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    # dp_rank -> (tp_rank, pp_rank) -> field -> [(phase, value)] (phase "" but for the graph)
    seen: dict[int, dict[tuple[int, int], dict[str, list[tuple[str, float]]]]] = {}
    try:
        for family in text_string_to_metric_families(text):
            field = FAMILIES.get(family.name)
            if field is None:
                continue
            for sample in family.samples:
                if sample.name != family.name:
                    continue  # _created and the like
                scheduler = (_index(sample.labels, "tp_rank"), _index(sample.labels, "pp_rank"))
                fields = seen.setdefault(_index(sample.labels, "dp_rank"), {}).setdefault(scheduler, {})
                phase = sample.labels.get("phase", "") if field == "graph" else ""
                fields.setdefault(field, []).append((phase, sample.value))
    except ShapeError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a Prometheus text exposition: {exc}") from None
    if not seen:
        return None
    if len(seen) > MAX_RANKS:
        raise ShapeError(f"{len(seen)} DP ranks (at most {MAX_RANKS} are read)")
    ranks = []
    for dp_rank in sorted(seen):
        fields = seen[dp_rank][min(seen[dp_rank])]
        totals = {name: _total(values) for name, values in fields.items()}
        gib = {name: None if total is None else total * GIB for name, total in totals.items()}
        tokens = totals.get("token_capacity")
        ranks.append(
            RankAccounting(
                dp_rank,
                {name: gib[name] for name in ("weight", "kvcache", "graph") if gib.get(name) is not None},
                None if tokens is None else int(tokens),
                startup_available=gib.get("startup_available"),
            )
        )
    return tuple(ranks)


def _total(values: list[tuple[str, float]]) -> float | None:
    """One figure (the phases summed, for the graph); None unless every value is a figure and no
    phase comes twice (two copies of one series: which is current is unknown)."""
    phases = [phase for phase, _ in values]
    if not values or len(set(phases)) != len(phases) or not all(math.isfinite(v) and v >= 0 for _, v in values):
        return None
    return sum(v for _, v in values)
