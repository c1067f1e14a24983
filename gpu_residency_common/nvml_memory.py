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


# NVML's "no instance" id in a process entry (whole GPUs, MIG off).
NO_INSTANCE = 0xFFFFFFFF


@dataclass(frozen=True)
class ProcessEntry:
    used: int | None  # None: NVML cannot say
    mig: tuple[int, int] | None = None  # (GPU instance, compute instance) the process runs on, with MIG on


def read_processes(nvml, handle: object) -> dict[int, int | None]:
    """PID -> used bytes (None: NVML cannot say) of the GPU's compute and graphics processes."""
    return {pid: entry.used for pid, entry in read_process_entries(nvml, handle).items()}


def read_process_entries(nvml, handle: object) -> dict[int, ProcessEntry]:
    """PID -> used bytes and MIG instance of the GPU's compute and graphics processes, merged
    by PID (a process in both lists is one holder), each list from the newest call the driver
    has. With MIG on, the parent GPU's lists hold every instance's processes, each with its
    instance's ids. NVMLError propagates (NVMLError_FunctionNotFound when no version exists)."""
    merged: dict[int, ProcessEntry] = {}
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
            before = merged.get(proc.pid)
            known = [v for v in (before.used if before else None, proc.usedGpuMemory) if v is not None]
            merged[proc.pid] = ProcessEntry(max(known) if known else None, _instance(proc) or (before and before.mig))
    return merged


def _instance(proc: object) -> tuple[int, int] | None:
    gi, ci = getattr(proc, "gpuInstanceId", NO_INSTANCE), getattr(proc, "computeInstanceId", NO_INSTANCE)
    return None if gi == NO_INSTANCE or ci == NO_INSTANCE else (int(gi), int(ci))


def nvml_reason(exc: Exception) -> str:
    """A short label value for an NVML error: 'gpu_is_lost', 'not_supported', ..."""
    name = type(exc).__name__.removeprefix("NVMLError_")
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_") or "unknown"


def text(value: object) -> str:
    """A string NVML returned (bytes on older bindings)."""
    return value.decode() if isinstance(value, bytes) else str(value)
