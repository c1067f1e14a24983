"""Whole-GPU memory and GPU process lists from NVML (nvidia-ml-py).

Each value NVML cannot give stays None (absent in the output), never 0: an idle GPU
and an unreadable one must not look alike. Newer NVML calls are tried first with the
older versions as fallback, so the exporter runs on old and new drivers alike. A whole
read has a deadline: real drivers do hang on a GPU in a bad state, and a scrape must
still answer (with `nvml_up 0`) rather than hang with it.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from exporter.errors import ErrorCounter
from gpu_residency_common.deadline import DeadlineExceeded, DeadlineRunner, QuietWork
from gpu_residency_common.nvml_memory import nvml_reason, read_memory, read_process_entries, text
from gpu_residency_common.nvml_mig import MigLayouts, MigReading

log = logging.getLogger(__name__)

# How long to wait before trying nvmlInit again after it failed (driver not loaded yet,
# library missing): often enough to notice a fixed node, rarely enough to cost nothing.
INIT_RETRY_SECONDS = 30.0
DEFAULT_TIMEOUT_SECONDS = 5.0
T = TypeVar("T")


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int | None  # None: NVML lists the process but cannot say its memory
    mig: tuple[int, int] | None = None  # (GPU instance, compute instance) it runs on, with MIG on


@dataclass(frozen=True)
class GpuReading:
    index: int
    uuid: str
    pci_bus_id: str
    model: str
    used_bytes: int | None
    total_bytes: int | None
    reserved_bytes: int | None
    processes: tuple[GpuProcess, ...] | None  # None: the process lists could not be read
    v1_memory: bool = False  # memory info v1: `used` includes the driver-reserved part
    mig: tuple[MigReading, ...] | None = ()  # its MIG devices; () without MIG, None: unreadable

    def mig_instance(self, key: tuple[int, int] | None) -> MigReading | None:
        """The MIG device with these (GPU instance, compute instance) ids, if read."""
        return next((m for m in self.mig or () if m.instance.key == key), None) if key else None


@dataclass(frozen=True)
class NvmlReading:
    up: bool
    gpus: tuple[GpuReading, ...]
    driver_version: str = ""
    unreadable_gpus: int = 0  # GPUs NVML counts but could not name (lost, failing): absent from `gpus`

    @property
    def complete(self) -> bool:
        """Every GPU and every GPU's process list was read: only then may "holds nothing" be believed."""
        return self.up and self.unreadable_gpus == 0 and all(gpu.processes is not None for gpu in self.gpus)


@dataclass(frozen=True)
class _Identity:
    handle: object
    uuid: str
    pci_bus_id: str
    model: str


class NvmlSource:
    """Reads every GPU once per call; initialises NVML lazily and retries after failure."""

    def __init__(
        self, errors: ErrorCounter, library_path: str | None = None, timeout: float = DEFAULT_TIMEOUT_SECONDS
    ) -> None:
        self._errors = errors
        self._library_path = library_path
        self._timeout = timeout
        self._runner = DeadlineRunner("nvml")
        self._lock = threading.Lock()
        self._nvml = None  # the pynvml module once initialised
        self._next_init = 0.0
        self._logged_failure = False
        self._identities: dict[int, _Identity] = {}
        self._mig = MigLayouts(lambda reason: errors.inc("nvml", reason))
        self._driver_version = ""

    def _init(self) -> bool:
        if self._nvml is not None:
            return True
        if time.monotonic() < self._next_init:
            return False
        self._next_init = time.monotonic() + INIT_RETRY_SECONDS
        try:
            if self._library_path:
                # Loading by path first makes the binding's dlopen("libnvidia-ml.so.1")
                # resolve to this already-loaded library (matched by soname).
                ctypes.CDLL(self._library_path)
            import pynvml

            pynvml.nvmlInit()
            self._driver_version = str(pynvml.nvmlSystemGetDriverVersion())
        except OSError as exc:
            return self._init_failed("library_not_found", f"cannot load {self._library_path}: {exc}")
        except Exception as exc:
            return self._init_failed(nvml_reason(exc), str(exc))
        self._nvml = pynvml
        self._identities.clear()
        self._mig.clear()
        log.info("NVML initialised, driver %s", self._driver_version)
        self._logged_failure = False
        return True

    def _init_failed(self, reason: str, message: str) -> bool:
        self._errors.inc("nvml", reason)
        if not self._logged_failure:
            log.warning(
                "NVML unavailable (%s); serving process and engine metrics only, "
                "gpu_residency_nvml_up=0; retrying every %.0fs",
                message,
                INIT_RETRY_SECONDS,
            )
            self._logged_failure = True
        return False

    def read(self, only: set[int] | None = None) -> NvmlReading:
        """Every GPU (or the indices in `only`), or nvml_up=0 when NVML is missing, failing or past its deadline."""
        down = NvmlReading(up=False, gpus=(), driver_version=self._driver_version)
        return self._with_deadline(lambda: self._read(only), down)

    def when_quiet(self, after: float, work: QuietWork | None) -> None:
        """`work` on the NVML thread once no read came for `after` seconds (DeadlineRunner.when_quiet):
        its reads run there at once."""
        self._runner.when_quiet(after, work)

    def used(self, only: set[int]) -> dict[int, int | None] | None:
        """Used memory of these GPUs alone, one call each: the GPU history's tick asks whether anything
        changed before it reads process lists. None when NVML is not up, past its deadline, or a GPU was
        never identified (a whole read answers then)."""
        return self._with_deadline(lambda: self._used(only), None)

    def _with_deadline(self, read: Callable[[], T], failed: T) -> T:
        try:
            return self._runner.call(read, self._timeout)
        except DeadlineExceeded as exc:
            self._errors.inc("nvml", "hung" if exc.busy else "timeout")
            if not exc.busy:
                log.warning(
                    "NVML did not answer in %gs (a GPU or the driver hangs); nvml_up=0 until it does", self._timeout
                )
            return failed

    def _used(self, only: set[int]) -> dict[int, int | None] | None:
        with self._lock:
            identities = {index: self._identities.get(index) for index in only}
            if self._nvml is None or None in identities.values():
                return None
            return {index: self._memory(identity.handle)[0] for index, identity in identities.items()}

    def _read(self, only: set[int] | None) -> NvmlReading:
        with self._lock:
            if not self._init():
                return NvmlReading(up=False, gpus=())
            nvml = self._nvml
            try:
                count = nvml.nvmlDeviceGetCount()
            except nvml.NVMLError as exc:
                self._errors.inc("nvml", nvml_reason(exc))
                return NvmlReading(up=False, gpus=(), driver_version=self._driver_version)
            if any(index >= count for index in self._identities):
                self._identities.clear()  # GPUs went away: indices may now name other cards
                self._mig.clear()
            asked = [index for index in range(count) if only is None or index in only]
            gpus = [gpu for index in asked if (gpu := self._read_gpu(index)) is not None]
            return NvmlReading(
                up=True, gpus=tuple(gpus), driver_version=self._driver_version, unreadable_gpus=len(asked) - len(gpus)
            )

    def _read_gpu(self, index: int) -> GpuReading | None:
        nvml = self._nvml
        try:
            identity = self._identities.get(index) or self._identify(index)
        except nvml.NVMLError as exc:
            # Without a UUID the GPU cannot be named in a series: drop it, count why.
            self._errors.inc("nvml", nvml_reason(exc))
            return None
        handle = identity.handle
        used, total, reserved, v1 = self._memory(handle)
        processes = self._processes(handle)
        seen = {proc.mig for proc in processes or () if proc.mig}
        return GpuReading(
            index=index,
            uuid=identity.uuid,
            pci_bus_id=identity.pci_bus_id,
            model=identity.model,
            used_bytes=used,
            total_bytes=total,
            reserved_bytes=reserved,
            processes=processes,
            v1_memory=v1,
            mig=self._mig.read(self._nvml, index, handle, seen),
        )

    def _identify(self, index: int) -> _Identity:
        """Handle, UUID, bus id and model never change while NVML is up; read them once."""
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        identity = _Identity(
            handle=handle,
            uuid=str(nvml.nvmlDeviceGetUUID(handle)),
            pci_bus_id=text(nvml.nvmlDeviceGetPciInfo(handle).busId),
            model=str(nvml.nvmlDeviceGetName(handle)),
        )
        self._identities[index] = identity
        return identity

    def _memory(self, handle: object) -> tuple[int | None, int | None, int | None, bool]:
        """(used, total, reserved, v1): v1 is an older driver whose `used` includes reserved memory."""
        try:
            info = read_memory(self._nvml, handle)
        except self._nvml.NVMLError as exc:
            self._errors.inc("nvml", nvml_reason(exc))
            return None, None, None, False
        return info.used, info.total, info.reserved, info.reserved is None

    def _processes(self, handle: object) -> tuple[GpuProcess, ...] | None:
        """Compute and graphics processes merged by PID; None when the lists cannot be read."""
        try:
            merged = read_process_entries(self._nvml, handle)
        except self._nvml.NVMLError as exc:
            self._errors.inc("nvml", nvml_reason(exc))
            return None
        return tuple(GpuProcess(pid=pid, used_bytes=entry.used, mig=entry.mig) for pid, entry in merged.items())
