"""The gate's last word per engine, so Prometheus can tell when an engine was woken anyway.

The gate (gate.ResidualGate, given `wake=` and a registry directory) writes its latest
decision for the engine it guards to `<registry>/gate/<engine>.json`; the exporter
publishes it for engines it knows, and an alert fires when an engine is active while the
gate's last decision for it was "not clear".
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.errors import ErrorCounter
from exporter.snapshot.attribution import Snapshot
from gpu_residency_common.files import UntrustedFileError, read_json

GATE_DIR = "gate"
MAX_RECORD_BYTES = 64 * 1024


def read_record(path: Path) -> tuple[bool, float]:
    """(clear, time) from one record; UntrustedFileError (with the counter's reason) otherwise."""
    data = read_json(path, MAX_RECORD_BYTES)
    clear, when = (data.get("clear"), data.get("time")) if isinstance(data, dict) else (None, None)
    if not isinstance(clear, bool) or isinstance(when, bool) or not isinstance(when, int | float):
        raise UntrustedFileError("malformed", f"{path}: not a gate record")
    if not math.isfinite(when):
        raise UntrustedFileError("malformed", f"{path}: time is not finite")
    return clear, float(when)


class GateRecords:
    def __init__(self, node: str, directory: Path | None, errors: ErrorCounter) -> None:
        self._node = node
        self._dir = directory / GATE_DIR if directory else None
        self._errors = errors

    def families(self, snapshot: Snapshot) -> Iterable[Metric]:
        clear = GaugeMetricFamily(
            "gpu_residency_gate_clear",
            "The gate's last decision for waking this engine: 1 clear, 0 blocked.",
            labels=["node", "engine"],
        )
        when = GaugeMetricFamily(
            "gpu_residency_gate_decision_timestamp_seconds",
            "When the gate last decided for this engine (Unix time).",
            labels=["node", "engine"],
        )
        try:
            present = set(os.listdir(self._dir)) if self._dir is not None else set()
        except OSError:
            present = set()  # no gate has recorded anything yet
        for engine in sorted(e.name for e in snapshot.engines):
            if f"{engine}.json" in present:
                try:
                    record = read_record(self._dir / f"{engine}.json")
                except UntrustedFileError as exc:
                    self._errors.inc("gate_records", exc.reason)
                    continue
                clear.add_metric([self._node, engine], 1 if record[0] else 0)
                when.add_metric([self._node, engine], record[1])
        yield clear
        yield when
