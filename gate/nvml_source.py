"""The local NVML source: in-process nvidia-ml-py, no exporter needed."""

from __future__ import annotations

import threading
from typing import ClassVar

from gate.readings import GpuSample, Holder, SourceError
from gpu_residency_common.deadline import DeadlineExceeded, DeadlineRunner
from gpu_residency_common.nvml_memory import read_memory

DEFAULT_NVML_TIMEOUT_S = 5.0


class NvmlSource:
    """In-process NVML (nvidia-ml-py), no exporter needed; holders are the GPU processes.

    Every read has a deadline: a hung driver makes the gate block with that reason instead of
    hanging the scheduler that imported it."""

    name = "nvml"
    poll_floor_s = 0.0  # a memory-only read costs ~0.1 ms for 8 GPUs: the gate's own pace decides

    _shared: ClassVar[dict[float, NvmlSource]] = {}
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls, timeout: float = DEFAULT_NVML_TIMEOUT_S) -> NvmlSource:
        """One started source per timeout for the whole process. Each source owns a worker
        thread for its deadline, so callers that build a gate per call (the drop-in helpers,
        polled every half second) reuse this one instead of starting a thread each time."""
        with cls._shared_lock:
            source = cls._shared.get(timeout)
            if source is None:
                source = cls._shared[timeout] = cls(timeout)  # SourceError: nothing is kept, the next call retries
            return source

    def __init__(self, timeout: float = DEFAULT_NVML_TIMEOUT_S) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise SourceError(f"nvml source: nvidia-ml-py is not installed ({exc})") from None
        self._nvml = pynvml
        self._timeout = timeout
        self._runner = DeadlineRunner("gate-nvml")
        # index -> (handle, uuid, bus id): fixed while NVML stays initialised (the gate never shuts it
        # down); only the worker thread touches it.
        self._identities: dict[int, tuple[object, str, str]] = {}
        try:
            self._runner.call(pynvml.nvmlInit, timeout)
        except DeadlineExceeded as exc:
            raise SourceError(f"nvml source: NVML did not start: {exc}") from None
        except pynvml.NVMLError as exc:
            raise SourceError(f"nvml source: NVML cannot start: {exc}") from None

    def read(self, node: str) -> list[GpuSample]:
        try:
            return self._runner.call(self._read, self._timeout)
        except DeadlineExceeded as exc:
            raise SourceError(f"nvml source: {exc} (a GPU or the driver hangs)") from None

    def read_used(self, node: str) -> list[GpuSample]:
        """Used memory only, no holders: what a wait repeats every few milliseconds."""
        try:
            return self._runner.call(self._read_used, self._timeout)
        except DeadlineExceeded as exc:
            raise SourceError(f"nvml source: {exc} (a GPU or the driver hangs)") from None

    def _read_used(self) -> list[GpuSample]:
        nvml = self._nvml
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            raise SourceError(f"nvml source: {exc}") from None
        if any(index >= count for index in self._identities):
            self._identities.clear()  # GPUs went away: indices may now name other cards
        samples = []
        for index in range(count):
            identity = self._identities.get(index)
            try:
                identity = identity or self._identify(index)
                used = read_memory(nvml, identity[0]).used
            except nvml.NVMLError_NotSupported:
                if identity is None:
                    continue
                used = None  # the GPU answers but has no figure: nvidia-smi shows "[N/A]"
            except nvml.NVMLError:
                self._identities.pop(index, None)  # named afresh next time (a GPU lost and back)
                continue  # this GPU cannot be read: a request for it finds no sample and blocks
            samples.append(GpuSample(index=index, uuid=identity[1], pci_bus_id=identity[2], used_bytes=used))
        return samples

    def _identify(self, index: int) -> tuple[object, str, str]:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        bus = nvml.nvmlDeviceGetPciInfo(handle).busId
        identity = (handle, str(nvml.nvmlDeviceGetUUID(handle)), bus.decode() if isinstance(bus, bytes) else str(bus))
        self._identities[index] = identity
        return identity

    def _read(self) -> list[GpuSample]:
        nvml = self._nvml
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            raise SourceError(f"nvml source: {exc}") from None
        samples = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = str(nvml.nvmlDeviceGetUUID(handle))
                bus = nvml.nvmlDeviceGetPciInfo(handle).busId
            except nvml.NVMLError:
                continue  # this GPU cannot be read: a request for it finds no sample and blocks
            try:
                used = read_memory(nvml, handle).used
            except nvml.NVMLError_NotSupported:
                used = None  # the GPU answers but has no figure: nvidia-smi shows "[N/A]"
            except nvml.NVMLError:
                continue
            samples.append(
                GpuSample(
                    index=index,
                    uuid=uuid,
                    pci_bus_id=bus.decode() if isinstance(bus, bytes) else str(bus),
                    used_bytes=used,
                    holders=self._holders(handle),
                )
            )
        return samples

    def _holders(self, handle: object) -> tuple[Holder, ...]:
        """The GPU's processes, named as the exporter names them (title, launcher, else comm)."""
        from exporter.proctable import ProcView  # standard library only; here so `import gate` stays light
        from gpu_residency_common.holders import holder_of

        try:
            processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except self._nvml.NVMLError:
            return ()
        view, holders = ProcView(), []
        for process in processes:
            if process.usedGpuMemory is None:
                continue
            info = view.info(process.pid)
            who = holder_of(view.title(process.pid), info.comm, list(view.launchers(process.pid))) if info else None
            holders.append(
                Holder("process", who.name if who else "", int(process.usedGpuMemory), pid=process.pid,
                       role=who.kind if who else "")
            )  # fmt: skip
        return tuple(sorted(holders, key=lambda h: -h.used_bytes))
