"""The JSON API for gates on other nodes: fresh readings without Prometheus' scrape interval.

    GET /api/v1/gpus    the scrape's collection (no older than --collection.min-interval):
                        every GPU's used and total memory, its holders (processes with their
                        holder, kind and engine), engine totals (with how much more each release
                        leaves, where the cycle history knows) and what no process accounts for
    GET /api/v1/wait?gpus=0,GPU-…&threshold_bytes=N&timeout=S
                        a long poll: answered as soon as every named GPU is under N bytes, or
                        after S seconds (capped by --api.max-wait) with the last reading and
                        `clear: false`

While anyone waits, one thread reads NVML every --api.wait-interval (10 ms) through the
exporter's own NvmlSource (its deadline and its lock: a scrape and the waiters never read
NVML at once) and wakes the waiters; with nobody waiting it stops. At most --api.max-waiters
wait at once (429 beyond). A client that disconnects frees its place at once. NVML down or
hung: waiters answer with `nvml_up: false` and the reason instead of waiting it out. Both
paths sit behind the same TLS and basic auth as /metrics (server.make_responder).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from exporter.errors import ErrorCounter
from exporter.snapshot.attribution import Snapshot
from exporter.snapshot.shared import SharedSnapshot
from exporter.sources.nvml import GpuReading, NvmlReading, NvmlSource
from exporter.web.server import Request, Response, Route, json_response
from exporter.web.wait import (
    DEFAULT_MAX_WAIT_S,
    DEFAULT_MAX_WAITERS,
    DEFAULT_WAIT_INTERVAL_S,
    GONE,
    BadRequest,
    WaitHub,
    WaitRequest,
    all_clear,
    match,
    nvml_reason,
    parse_wait,
)
from gpu_residency_common.nvml_mig import MigReading

# (engine, GPU uuid) -> what the exporter knows of the engine there beside its memory, as fields of its
# entry: residual_growth_bytes_per_cycle (its creep), unknown_resources (what it cannot say it released)
EngineNotes = Callable[[str, str], dict]


def gpu_body(gpu: GpuReading, snapshot: Snapshot | None, notes: EngineNotes | None = None) -> dict:
    """A GPU with its holders, and under `mig` each MIG device with its own; `notes` add to each engine's entry."""
    body = {
        "index": gpu.index,
        "uuid": gpu.uuid,
        "pci_bus_id": gpu.pci_bus_id,
        "model": gpu.model,
        "used_bytes": gpu.used_bytes,
        "total_bytes": gpu.total_bytes,
        "reserved_bytes": gpu.reserved_bytes,
    }
    held = functools.partial(_held, snapshot, gpu, notes=notes)
    return {**held(None), **body, "mig": [_mig_body(m, held) for m in gpu.mig or ()]}


def _mig_body(mig: MigReading, held: Callable[[MigReading], dict]) -> dict:
    instance = mig.instance
    ids = {"uuid": instance.uuid, "gpu_instance": instance.gpu_instance, "compute_instance": instance.compute_instance}
    return {**ids, "profile": instance.profile, "used_bytes": mig.used_bytes, "total_bytes": mig.total_bytes,
            **held(mig)}  # fmt: skip


def _held(snapshot: Snapshot | None, gpu: GpuReading, mig: MigReading | None, notes: EngineNotes | None) -> dict:
    """Engines, processes and the rest on the GPU (`mig` None: all of it) or on one MIG device;
    nothing without a snapshot (a wait's reading)."""
    if snapshot is None:
        return {}

    def here(on_gpu: GpuReading, on_mig: MigReading | None) -> bool:
        return on_gpu.uuid == gpu.uuid and (mig is None or on_mig is mig)

    engines: dict[str, int | None] = {}  # summed over the GPU's devices; unknown if any part is
    for usage in snapshot.engine_usage:
        if here(usage.gpu, usage.mig):
            known = engines.get(usage.engine, 0)
            engines[usage.engine] = None if known is None or usage.used_bytes is None else known + usage.used_bytes
    rest = snapshot.unattributed if mig is None else [(g, v) for g, m, v in snapshot.mig_unattributed if m is mig]
    return {
        "engines": [
            {"engine": name, "used_bytes": used, **(notes(name, gpu.uuid) if notes else {})}
            for name, used in engines.items()
            if used is not None
        ],
        "holders": [
            {
                "pid": p.pid,
                "comm": p.comm,
                "holder": p.holder.name,
                "kind": p.holder.kind,
                "engine": p.engine,
                "pod_uid": p.pod_uid,
                "used_bytes": p.used_bytes,
            }
            for p in sorted(snapshot.processes, key=lambda p: -(p.used_bytes or 0))
            if here(p.gpu, p.mig) and p.used_bytes is not None
        ],
        "unattributed_bytes": next((v for g, v in rest if g.uuid == gpu.uuid), None),
        # On a device: only if every process of its GPU was placed on one (else it may be this one's).
        "processes_known": gpu.processes is not None
        and (mig is None or all(p.mig is not None for p in snapshot.processes if p.gpu.uuid == gpu.uuid)),
    }


class GpuApi:
    """The handlers; `routes()` is what exporter/runtime.py registers with the server."""

    def __init__(
        self,
        node: str,
        snapshots: SharedSnapshot,
        nvml: NvmlSource,
        errors: ErrorCounter,
        max_waiters: int = DEFAULT_MAX_WAITERS,
        max_wait: float = DEFAULT_MAX_WAIT_S,
        interval: float = DEFAULT_WAIT_INTERVAL_S,
        notes: EngineNotes | None = None,
    ) -> None:
        """`notes`: what else is known of each engine on each GPU (its creep, what it cannot say it released)."""
        self._node = node
        self._notes = notes
        self._snapshots = snapshots
        self._errors = errors
        self._max_wait = max_wait
        self.hub = WaitHub(nvml, errors, interval, max_waiters)

    def routes(self) -> dict[str, Route]:
        return {"/api/v1/gpus": self.gpus, "/api/v1/wait": self.wait}

    def _collect(self, max_age: float | None = 0) -> tuple[Snapshot, str]:
        """A collection no older than `max_age` (None: the scrape's min interval), and why NVML is down."""
        before = self._errors.snapshot()
        snapshot, _ = self._snapshots.snapshot(max_age=max_age)
        reason = "" if snapshot.nvml.up else nvml_reason(before, self._errors.snapshot())
        return snapshot, reason

    def _body(self, snapshot: Snapshot, reason: str) -> dict:
        return {
            "node": self._node,
            "nvml_up": snapshot.nvml.up,
            "reason": reason,
            "taken_at": snapshot.taken_at,
            "age_seconds": max(0.0, time.time() - snapshot.taken_at),
            "unreadable_gpus": snapshot.nvml.unreadable_gpus,
            "gpus": [gpu_body(gpu, snapshot, self._notes) for gpu in snapshot.nvml.gpus],
        }

    def gpus(self, request: Request) -> Response:
        # The scrape's collection: any number of clients cost one NVML and /proc pass an interval.
        snapshot, reason = self._collect(max_age=None)
        return json_response(200, self._body(snapshot, reason))

    def wait(self, request: Request) -> Response:
        try:
            wanted = parse_wait(request.query, self._max_wait)
        except BadRequest as exc:
            return json_response(400, {"error": str(exc)})
        if not self.hub.enter():
            status, headers, body = json_response(429, {"error": "too many waiters; retry, or read /api/v1/gpus"})
            return status, [*headers, ("Retry-After", "1")], body
        started = time.monotonic()
        try:
            look = self.hub.wait(wanted, request.connection)
        finally:
            self.hub.leave()
        waited = time.monotonic() - started
        if look is GONE:
            return json_response(499, {"error": "client closed the connection"})  # nobody reads it
        if look is None:
            body = self._down("no NVML reading within the wait (a GPU or the driver hangs)")
        elif not look.reading.up:
            body = self._down(look.reason)
        elif all_clear(look.reading, wanted):
            body = self._answer(wanted, look.reading, None, look.taken_at)
        else:
            # Not clear by the timeout: one full collection, so the answer names the holders (and
            # is the freshest reading: if it is clear, it says so).
            snapshot, reason = self._collect()
            if not snapshot.nvml.up:
                body = self._down(reason)
            else:
                body = self._answer(wanted, snapshot.nvml, snapshot, snapshot.taken_at)
        body.update(threshold_bytes=wanted.threshold_bytes, timeout=wanted.timeout, waited_seconds=waited)
        return json_response(200, body)

    def _down(self, reason: str) -> dict:
        return {"node": self._node, "clear": False, "nvml_up": False, "reason": reason, "gpus": []}

    def _answer(self, wanted: WaitRequest, reading: NvmlReading, snapshot: Snapshot | None, taken_at: float) -> dict:
        gpus, missing = [], []
        for name in wanted.names:
            found = match(reading, name)
            if len(found) == 1:
                if all(g["uuid"] != found[0][0].uuid for g in gpus):  # a MIG device comes with its GPU
                    gpus.append(gpu_body(found[0][0], snapshot, self._notes))
            else:
                missing.append(name)
        return {
            "node": self._node,
            "clear": all_clear(reading, wanted),
            "nvml_up": True,
            "reason": f"no GPU or several match {', '.join(missing)}" if missing else "",
            "taken_at": taken_at,
            "age_seconds": max(0.0, time.time() - taken_at),
            "gpus": gpus,
        }
