"""MIG devices (GPU instance + compute instance slices) of a GPU, read through NVML's MIG calls.

The layout of a GPU (which MIG devices exist, their UUIDs, ids and profiles) is read once per
NVML session and kept: walking every slot with nvmlDeviceGetMigDeviceHandleByIndex costs a
failed look-up (NOT_FOUND) per empty slot, and repeating failed look-ups on every scrape is
what made dcgm-exporter burn cores on dense MIG nodes (NVIDIA/dcgm-exporter#599). It is read
again (MIG mode included: changing it takes a GPU reset, which fails the old handles) only on
evidence that it changed: a known instance's handle failed (destroyed), the parent listed a
process on an instance the layout lacks (created), or LAYOUT_MAX_AGE seconds passed (an
instance created with nothing on it yet, MIG turned on). A change found mid-collection is
re-read in that same collection, once, so it costs one collection at most; a GPU without MIG
answers NOT_SUPPORTED once per session and is not asked again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gpu_residency_common.nvml_memory import nvml_reason, read_memory, text

LAYOUT_MAX_AGE = 30.0  # seconds a layout is trusted without evidence of change


@dataclass(frozen=True)
class MigInstance:
    """What does not change while the instance exists."""

    uuid: str  # MIG-...
    gpu_instance: int
    compute_instance: int
    profile: str  # 1g.10gb, from the device name NVML gives ("NVIDIA H100 80GB HBM3 MIG 1g.10gb")
    handle: object = field(compare=False)  # ctypes pointers do not hash

    @property
    def key(self) -> tuple[int, int]:
        return (self.gpu_instance, self.compute_instance)

    @property
    def label(self) -> str:
        """GI/CI, the ids nvidia-smi prints in its MIG devices table."""
        return f"{self.gpu_instance}/{self.compute_instance}"


@dataclass(frozen=True)
class MigReading:
    """A device's memory: its GPU instance's, which every compute instance of it reports alike;
    `shared`: an earlier device (a lower compute instance) of the same GPU instance reported it."""

    instance: MigInstance
    used_bytes: int | None
    total_bytes: int | None
    shared: bool = False


@dataclass
class _Layout:
    instances: tuple[MigInstance, ...]
    read_at: float


class MigLayouts:
    """Per parent GPU index, its MIG layout for this NVML session (see the module docstring)."""

    def __init__(self, on_error: Callable[[str], None] = lambda reason: None) -> None:
        """`on_error(reason)` counts a failed MIG call (reason: 'mig_' + NVML's error name)."""
        self._on_error = on_error
        self._layouts: dict[int, _Layout] = {}
        self._no_mig: set[int] = set()  # GPUs that answered NOT_SUPPORTED: not asked again this session

    def clear(self) -> None:
        """A new NVML session (or GPUs renumbered): handles and ids are read afresh."""
        self._layouts.clear()
        self._no_mig.clear()

    def read(self, nvml, index: int, handle: object, seen: set[tuple[int, int]]) -> tuple[MigReading, ...] | None:
        """The GPU's MIG devices with their memory: () without MIG, None when it cannot be read.
        `seen`: the (GI, CI) pairs the parent's process list named this collection."""
        if index in self._no_mig:
            return ()
        layout = self._layouts.get(index)
        rescanned = layout is None or time.monotonic() - layout.read_at > LAYOUT_MAX_AGE
        if rescanned or not seen <= {instance.key for instance in layout.instances}:
            layout, rescanned = self._enumerate(nvml, index, handle), True
        if layout is None:
            return () if index in self._no_mig else None
        readings, failed = self._memory(nvml, layout.instances, count=rescanned)
        if failed and not rescanned:  # an instance was destroyed: read the layout again, once
            layout = self._enumerate(nvml, index, handle)
            readings, _ = self._memory(nvml, layout.instances, count=True) if layout else ((), False)
        return readings

    def _enumerate(self, nvml, index: int, handle: object) -> _Layout | None:
        """The MIG mode, then every slot once; an empty slot (NOT_FOUND) or a failing one is
        remembered as nothing. None when the mode cannot be read (or the GPU has no MIG)."""
        self._layouts.pop(index, None)
        try:
            mode = nvml.nvmlDeviceGetMigMode(handle)[0]
        except (nvml.NVMLError_NotSupported, nvml.NVMLError_FunctionNotFound):
            self._no_mig.add(index)
            return None
        except nvml.NVMLError as exc:
            self._on_error("mig_" + nvml_reason(exc))
            return None
        instances = []
        try:
            slots = nvml.nvmlDeviceGetMaxMigDeviceCount(handle) if mode == nvml.NVML_DEVICE_MIG_ENABLE else 0
        except nvml.NVMLError as exc:
            self._on_error("mig_" + nvml_reason(exc))
            slots = 0
        for slot in range(slots):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
                name = text(nvml.nvmlDeviceGetName(mig))
                instances.append(
                    MigInstance(
                        handle=mig,
                        uuid=text(nvml.nvmlDeviceGetUUID(mig)),
                        gpu_instance=int(nvml.nvmlDeviceGetGpuInstanceId(mig)),
                        compute_instance=int(nvml.nvmlDeviceGetComputeInstanceId(mig)),
                        profile=name.rsplit(" MIG ", 1)[1] if " MIG " in name else "",
                    )
                )
            except nvml.NVMLError_NotFound:
                continue
            except nvml.NVMLError as exc:
                self._on_error("mig_" + nvml_reason(exc))
        ordered = tuple(sorted(instances, key=lambda instance: instance.key))
        layout = self._layouts[index] = _Layout(ordered, time.monotonic())
        return layout

    def _memory(self, nvml, instances: tuple[MigInstance, ...], count: bool) -> tuple[tuple[MigReading, ...], bool]:
        """The instances' memory, and whether a handle failed (its instance destroyed, or
        failing); a failed instance is left out, and counted when `count`. Every handle is read,
        a GPU instance's later compute instances too: a destroyed one must fail here."""
        readings, failed, instances_seen = [], False, set()
        for instance in instances:
            shared = instance.gpu_instance in instances_seen
            try:
                info = read_memory(nvml, instance.handle)
            except nvml.NVMLError_NotSupported:
                readings.append(MigReading(instance, None, None, shared))
                continue
            except nvml.NVMLError as exc:
                failed = True
                if count:
                    self._on_error("mig_" + nvml_reason(exc))
                continue
            instances_seen.add(instance.gpu_instance)
            readings.append(MigReading(instance, info.used, info.total, shared))
        return tuple(readings), failed
