"""SGLang `/server_info` accounting, parsed: what each engine says it allocated at start-up.

These numbers are accounting, never residency: SGLang measures them once at start-up,
so a slept engine still reports its full pools. They sit next to the measured residency
so a reader can compare the two.

The shape has changed across SGLang releases; every shape below is read:
- `internal_states`: one dict per DP rank (older releases: a flat dict, one rank);
- `memory_usage`: `kvcache` and `token_capacity` (oldest), plus `weight`, plus the graph
  memory as `cuda_graph` (a number), `graph` (a number) or `graph` (a dict per phase);
- values in GiB (SGLang writes "GB").
A component that is absent or not a finite non-negative number yields no series.

Standard library only: the exporter's poller and the framework-facing drop-ins (gate.miles_sleep)
read one parser, so every shape is read the same way in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpu_residency_common.files import parse_json_as

GIB = 1024**3
COMPONENTS = ("weight", "kvcache", "graph")


class ShapeError(ValueError):
    """The body is JSON but not a /server_info we understand."""


@dataclass(frozen=True)
class RankAccounting:
    dp_rank: int
    components: dict[str, float]  # component -> bytes
    token_capacity: int | None
    startup_available: float | None = None  # bytes free on the GPU when the engine started (newer releases)


def _gib(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return float(value) * GIB


def _graph_bytes(usage: dict) -> float | None:
    graph = usage.get("graph", usage.get("cuda_graph"))
    if isinstance(graph, dict):
        phases = [_gib(v) for v in graph.values()]
        known = [v for v in phases if v is not None]
        return sum(known) if known and len(known) == len(phases) else None
    return _gib(graph)


def parse_server_info(body: bytes | str) -> list[RankAccounting]:
    """Accounting per DP rank from a /server_info (or /get_server_info) body."""
    info = parse_json_as(ValueError, body)
    if not isinstance(info, dict):
        raise ShapeError("top level is not an object")
    states = info.get("internal_states")
    if isinstance(states, dict):
        states = [states]
    if states is None and "memory_usage" in info:
        states = [info]  # releases that put the state at the top level
    if not isinstance(states, list):
        raise ShapeError("no internal_states list")
    ranks = []
    for dp_rank, state in enumerate(states):
        if not isinstance(state, dict):
            raise ShapeError(f"internal_states[{dp_rank}] is not an object")
        usage = state.get("memory_usage")
        if usage is None:
            ranks.append(RankAccounting(dp_rank, {}, None))  # very old releases: nothing to read
            continue
        if not isinstance(usage, dict):
            raise ShapeError(f"internal_states[{dp_rank}].memory_usage is not an object")
        values = {
            "weight": _gib(usage.get("weight")),
            "kvcache": _gib(usage.get("kvcache")),
            "graph": _graph_bytes(usage),
        }
        capacity = usage.get("token_capacity")
        ranks.append(
            RankAccounting(
                dp_rank,
                {name: value for name, value in values.items() if value is not None},
                capacity if isinstance(capacity, int) and not isinstance(capacity, bool) and capacity >= 0 else None,
                _gib(usage.get("startup_available")),
            )
        )
    return ranks
