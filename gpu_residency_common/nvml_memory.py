"""Whole-GPU memory from NVML on old and new drivers alike (the exporter and the gate read it the same way)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryInfo:
    used: int
    total: int
    reserved: int | None  # None with memory info v1, whose `used` includes the reserved part


def read_memory(nvml, handle: object) -> MemoryInfo:
    """Memory info v2 (used excludes driver-reserved memory), else v1 on drivers without it.

    `nvml` is the pynvml module; its NVMLError propagates for anything but "this driver
    has no v2" (function missing, not supported, or an older struct version)."""
    try:
        info = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
        return MemoryInfo(int(info.used), int(info.total), int(info.reserved))
    except (nvml.NVMLError_FunctionNotFound, nvml.NVMLError_NotSupported, nvml.NVMLError_ArgumentVersionMismatch):
        pass
    info = nvml.nvmlDeviceGetMemoryInfo(handle)
    return MemoryInfo(int(info.used), int(info.total), None)


def read_processes(nvml, handle: object) -> dict[int, int | None]:
    """PID -> used bytes (None: NVML cannot say) of the GPU's compute and graphics processes,
    merged by PID (a process in both lists is one holder), each list from the newest call the
    driver has. NVMLError propagates (NVMLError_FunctionNotFound when no version exists)."""
    merged: dict[int, int | None] = {}
    for calls in (
        (nvml.nvmlDeviceGetComputeRunningProcesses_v3, nvml.nvmlDeviceGetComputeRunningProcesses_v2),
        (nvml.nvmlDeviceGetGraphicsRunningProcesses_v3, nvml.nvmlDeviceGetGraphicsRunningProcesses_v2),
    ):
        for position, call in enumerate(calls):
            try:
                listed = call(handle)
                break
            except nvml.NVMLError_FunctionNotFound:
                if position == len(calls) - 1:
                    raise
        for proc in listed:
            known = [v for v in (merged.get(proc.pid), proc.usedGpuMemory) if v is not None]
            merged[proc.pid] = max(known) if known else None
    return merged
