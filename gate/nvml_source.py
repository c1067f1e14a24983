"""The local NVML source: in-process nvidia-ml-py, no exporter needed."""

from __future__ import annotations

import threading
from typing import ClassVar

from gate.readings import GpuSample, SourceError
from gpu_residency_common.deadline import DeadlineExceeded, DeadlineRunner
from gpu_residency_common.nvml_memory import read_memory, read_process_entries
from gpu_residency_common.nvml_mig import MigLayouts

DEFAULT_NVML_TIMEOUT_S = 5.0


class NvmlSource:
    """In-process NVML (nvidia-ml-py), no exporter needed; holders named as the exporter names them.

    Every read has a deadline: a hung driver makes the gate block with that reason instead of
    hanging the scheduler that imported it."""

    name = "nvml"
    reads_mig = True  # MIG devices are samples of their own: MIG-... and `gpu:gi` name them
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
        self._mig = MigLayouts()  # each GPU's MIG devices, read as the exporter reads them
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
            self._mig.clear()
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
            samples.extend(
                GpuSample(index, mig.instance.uuid, identity[2], mig.used_bytes, parent_uuid=identity[1],
                          gpu_instance=mig.instance.gpu_instance)
                for mig in self._mig.read(nvml, index, identity[0], set()) or ()
            )  # fmt: skip
        return samples

    def _identify(self, index: int) -> tuple[object, str, str]:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        bus = nvml.nvmlDeviceGetPciInfo(handle).busId
        identity = (handle, str(nvml.nvmlDeviceGetUUID(handle)), bus.decode() if isinstance(bus, bytes) else str(bus))
        self._identities[index] = identity
        return identity

    def _read(self) -> list[GpuSample]:
        """Every GPU with its holders: engines from the registry, as the exporter names them."""
        from gate.local_holders import with_holders

        nvml = self._nvml
        samples = self._read_used()
        listed: dict[str, dict | None] = {}  # parent UUID -> its processes with their MIG devices
        for sample in samples:
            if sample.gpu_instance is None:
                try:
                    listed[sample.uuid] = read_process_entries(nvml, self._identities[sample.index][0])
                except (KeyError, nvml.NVMLError):
                    listed[sample.uuid] = None  # the holders cannot be told: "cannot tell", never "nothing"
        processes = {s.uuid: _held_on(s, listed.get(s.parent_uuid or s.uuid)) for s in samples}
        return with_holders(samples, processes, None)


def _held_on(sample: GpuSample, entries: dict | None) -> dict[int, int | None] | None:
    """PID -> bytes on the GPU, or on the MIG device (its GPU instance: compute instances share its
    memory); None when that cannot be told (unread, or a process NVML did not place)."""
    if entries is None:
        return None
    if sample.gpu_instance is None:
        return {pid: entry.used for pid, entry in entries.items()}
    if any(entry.mig is None for entry in entries.values()):
        return None
    return {pid: entry.used for pid, entry in entries.items() if entry.mig[0] == sample.gpu_instance}
