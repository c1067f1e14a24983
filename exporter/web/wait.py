"""The long poll behind GET /api/v1/wait: one thread reads NVML every --api.wait-interval while
anyone waits, and stops when nobody does (see exporter/web/gpus_api.py for the contract)."""

from __future__ import annotations

import math
import socket
import threading
import time
from dataclasses import dataclass

from exporter.errors import ErrorCounter
from exporter.sources.nvml import GpuReading, NvmlReading, NvmlSource
from exporter.web.server import client_gone
from gate.readings import GpuSample, normalise
from gpu_residency_common.nvml_mig import MigReading

MAX_GPUS_PER_WAIT = 64
MAX_GPU_NAME = 128
DEFAULT_MAX_WAITERS = 16
DEFAULT_MAX_WAIT_S = 60.0
DEFAULT_WAIT_INTERVAL_S = 0.01
DISCONNECT_CHECK_S = 0.05  # how often a waiter looks at its connection when no reading arrives
NO_READING_GRACE_S = 1.0  # past its timeout, how long a waiter waits for its first reading (NVML slow)

# NVML error reasons (gpu_residency_errors_total{source="nvml"}) in words.
NVML_REASONS = {
    "timeout": "NVML did not answer within --nvml.timeout (a GPU or the driver hangs)",
    "hung": "an earlier NVML call has not returned (a GPU or the driver hangs)",
    "library_not_found": "the NVML library cannot be loaded",
    "driver_not_loaded": "the NVIDIA driver is not loaded",
}


class BadRequest(ValueError):
    """A query the API cannot answer; the message says which parameter and why."""


@dataclass(frozen=True)
class WaitRequest:
    names: tuple[str, ...]
    threshold_bytes: int
    timeout: float  # after the cap


@dataclass(frozen=True)
class _Look:
    started: float  # monotonic, when the read began
    taken_at: float  # wall clock
    reading: NvmlReading
    reason: str  # why NVML is down ("" when up)


def parse_wait(query: dict[str, list[str]], max_wait: float) -> WaitRequest:
    def one(name: str) -> str:
        values = query.get(name)
        if not values or not values[0].strip():
            raise BadRequest(f"{name} is required")
        if len(values) > 1:
            raise BadRequest(f"{name} given more than once")
        return values[0].strip()

    items = [item.strip() for item in one("gpus").split(",")]
    if not all(items) or len(items) > MAX_GPUS_PER_WAIT:
        raise BadRequest(f"gpus: 1 to {MAX_GPUS_PER_WAIT} comma-separated indices, UUIDs or PCI bus ids")
    names = []
    for item in items:
        if len(item) > MAX_GPU_NAME:
            raise BadRequest(f"gpus: {item[:20]}... is longer than {MAX_GPU_NAME} characters")
        try:
            names.append(normalise(item))
        except ValueError as exc:
            raise BadRequest(f"gpus: {exc}") from None
    raw_threshold = one("threshold_bytes")
    if not raw_threshold.isdigit() or not 0 < int(raw_threshold) < 2**63:
        raise BadRequest("threshold_bytes: a whole number of bytes > 0")
    raw_timeout = query.get("timeout", [str(max_wait)])
    try:
        timeout = float(raw_timeout[0]) if len(raw_timeout) == 1 else math.nan
    except ValueError:
        timeout = math.nan
    if not (math.isfinite(timeout) and timeout >= 0):
        raise BadRequest("timeout: seconds >= 0, once")
    return WaitRequest(tuple(names), int(raw_threshold), min(timeout, max_wait))


class WaitHub:
    """Fast NVML reads while anyone waits, shared by every waiter; bounded waiters."""

    def __init__(self, nvml: NvmlSource, errors: ErrorCounter, interval: float, max_waiters: int) -> None:
        self._nvml = nvml
        self._errors = errors
        self._interval = interval
        self._max_waiters = max_waiters
        self._cond = threading.Condition()
        self._waiters = 0
        self._thread: threading.Thread | None = None
        self._latest: _Look | None = None
        self.reads = 0  # NVML reads made for waiters (tests and benchmarks)

    @property
    def waiters(self) -> int:
        with self._cond:
            return self._waiters

    def enter(self) -> bool:
        """Take a place; False when every place is taken."""
        with self._cond:
            if self._waiters >= self._max_waiters:
                return False
            self._waiters += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="api-wait", daemon=True)
                self._thread.start()
            return True

    def leave(self) -> None:
        with self._cond:
            self._waiters -= 1

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._waiters == 0:
                    self._thread = None  # under the lock: the next enter() starts a new one
                    return
            started = time.monotonic()
            before = self._errors.snapshot()
            try:
                reading = self._nvml.read()  # never raises: down, failing or hung is up=False
                reason = "" if reading.up else nvml_reason(before, self._errors.snapshot())
            except Exception as exc:  # a bug must not leave waiters waiting forever
                reading, reason = NvmlReading(up=False, gpus=()), f"reading NVML failed: {exc!r}"
            look = _Look(started, time.time(), reading, reason)
            with self._cond:
                self.reads += 1
                self._latest = look
                self._cond.notify_all()
            time.sleep(max(0.0, self._interval - (time.monotonic() - started)))

    def wait(self, request: WaitRequest, connection: socket.socket | None) -> _Look | None:
        """The first reading begun after this call where every GPU is clear or NVML is down, or the
        last reading at the timeout (None when none arrived: NVML is slow or hangs). Returns
        None at once when the client disconnects."""
        arrived = time.monotonic()
        deadline = arrived + request.timeout
        seen: _Look | None = None
        with self._cond:
            while True:
                latest = self._latest
                if latest is not None and latest is not seen and latest.started >= arrived:
                    seen = latest
                    if not latest.reading.up or all_clear(latest.reading, request):
                        return latest
                now = time.monotonic()
                if now >= deadline and seen is not None:
                    return seen
                if now >= deadline + NO_READING_GRACE_S:
                    return None  # not one reading since the request came: the read under way hangs
                if client_gone(connection):
                    return GONE
                until = deadline if seen is not None or now < deadline else deadline + NO_READING_GRACE_S
                self._cond.wait(min(DISCONNECT_CHECK_S, max(0.001, until - now)))


GONE = _Look(0.0, 0.0, NvmlReading(up=False, gpus=()), "client gone")


def nvml_reason(before: dict[tuple[str, str], int], after: dict[tuple[str, str], int]) -> str:
    """What NVML failed with during a read, from the error counts it added."""
    reasons = [
        reason
        for (source, reason), count in after.items()
        if source == "nvml" and count > before.get((source, reason), 0)
    ]
    if not reasons:
        return "NVML is not answering (see the exporter's log)"
    return "; ".join(NVML_REASONS.get(reason, f"NVML error: {reason}") for reason in sorted(reasons))


def match(reading: NvmlReading, name: str) -> list[tuple[GpuReading, MigReading | None]]:
    """The GPUs (with None) and MIG devices (with their GPU) that `name` names."""
    found = []
    for gpu in reading.gpus:
        if GpuSample(gpu.index, gpu.uuid, gpu.pci_bus_id, None).matches(name):
            found.append((gpu, None))
        for mig in gpu.mig or ():
            instance = mig.instance
            device = GpuSample(gpu.index, instance.uuid, gpu.pci_bus_id, None, parent_uuid=gpu.uuid,
                               gpu_instance=instance.gpu_instance)  # fmt: skip
            if device.matches(name):
                found.append((gpu, mig))
    return found


def all_clear(reading: NvmlReading, request: WaitRequest) -> bool:
    """Every name matches exactly one GPU or MIG device, whose used memory is known and under the threshold."""
    for name in request.names:
        found = match(reading, name)
        used = None if len(found) != 1 else (found[0][1] or found[0][0]).used_bytes
        if used is None or used >= request.threshold_bytes:
            return False
    return True
