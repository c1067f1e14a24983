"""Where the gate reads whole-GPU used memory: local NVML, Prometheus, or nvidia-smi.

Each source returns every GPU of the node as GpuSample or raises SourceError; the gate
picks the requested GPUs. Nothing here is imported until a source is built, so
`import gate` stays free of pynvml (and everything else outside the standard library).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Protocol

from gate.readings import GpuSample, Holder, SourceError

MIB = 1024**2


class Source(Protocol):
    name: str

    def read(self, node: str) -> list[GpuSample]: ...


# ---------- local NVML ----------


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class NvmlSource:
    """In-process NVML (nvidia-ml-py), no exporter needed; holders are the GPU processes."""

    name = "nvml"

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise SourceError(f"nvml source: nvidia-ml-py is not installed ({exc})") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise SourceError(f"nvml source: NVML cannot start: {exc}") from None
        self._nvml = pynvml

    def read(self, node: str) -> list[GpuSample]:
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
                try:
                    used = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2).used
                except (nvml.NVMLError_FunctionNotFound, nvml.NVMLError_NotSupported):
                    used = nvml.nvmlDeviceGetMemoryInfo(handle).used
            except nvml.NVMLError:
                continue  # this GPU cannot be read: a request for it finds no sample and blocks
            samples.append(
                GpuSample(
                    index=index,
                    uuid=uuid,
                    pci_bus_id=bus.decode() if isinstance(bus, bytes) else str(bus),
                    used_bytes=int(used),
                    holders=self._holders(handle),
                )
            )
        return samples

    def _holders(self, handle: object) -> tuple[Holder, ...]:
        try:
            processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except self._nvml.NVMLError:
            return ()
        return tuple(
            Holder("process", f"pid {p.pid} {_comm(p.pid)}".strip(), int(p.usedGpuMemory))
            for p in processes
            if p.usedGpuMemory is not None
        )


# ---------- Prometheus ----------


def escape_label_value(value: str) -> str:
    """A PromQL double-quoted string literal's content: nothing in it can end the string."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


METRICS = (
    "gpu_residency_memory_used_bytes",
    "gpu_residency_engine_memory_bytes",
    "gpu_residency_process_memory_bytes",
    "gpu_residency_unattributed_memory_bytes",
)


def build_query(node: str, window_seconds: int) -> str:
    """One query for a poll: the raw recent samples (with their own timestamps) of the node's
    used, engine, process and unattributed memory."""
    names = "|".join(METRICS)
    return f'{{__name__=~"{names}",node="{escape_label_value(node)}"}}[{window_seconds}s]'


class PrometheusSource:
    """One instant query per poll against the Prometheus HTTP API; samples carry their age."""

    name = "prometheus"

    def __init__(self, url: str, timeout: float = 5.0, window_seconds: int = 300) -> None:
        import urllib.parse  # here, not at the top: `import gate` stays fast where this source is unused

        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SourceError(f"prometheus source: {url!r} is not an http(s) URL")
        self._endpoint = url.rstrip("/") + "/api/v1/query"
        self._timeout = timeout
        self._window = window_seconds

    def read(self, node: str) -> list[GpuSample]:
        import urllib.error
        import urllib.parse
        import urllib.request

        query = build_query(node, self._window)
        body = urllib.parse.urlencode({"query": query}).encode()
        request = urllib.request.Request(self._endpoint, data=body, method="POST")
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                payload = json.loads(response.read(16 * MIB))
        except urllib.error.HTTPError as exc:
            raise SourceError(f"prometheus source: HTTP {exc.code} from {self._endpoint}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SourceError(f"prometheus source: cannot reach {self._endpoint}: {reason}") from None
        except ValueError:
            raise SourceError(f"prometheus source: {self._endpoint} did not answer JSON") from None
        if payload.get("status") != "success" or payload.get("data", {}).get("resultType") != "matrix":
            raise SourceError(f"prometheus source: query failed: {payload.get('error', 'unexpected answer')}")
        return self._samples(payload["data"]["result"], time.time())

    @staticmethod
    def _samples(result: list, now: float) -> list[GpuSample]:
        used: dict[str, tuple[dict, float, float]] = {}
        holders: dict[str, list[tuple[float, Holder]]] = {}
        for series in result:
            labels, values = series.get("metric", {}), series.get("values") or []
            if not values:
                continue
            stamp, value = float(values[-1][0]), float(values[-1][1])
            if not math.isfinite(value):
                continue
            name, uuid = labels.get("__name__"), labels.get("uuid", "")
            if name == "gpu_residency_memory_used_bytes":
                if uuid not in used or used[uuid][1] < stamp:
                    used[uuid] = (labels, stamp, value)
            else:
                holder = _holder(name, labels, int(value))
                if holder is not None:
                    holders.setdefault(uuid, []).append((stamp, holder))
        samples = []
        for uuid, (labels, stamp, value) in used.items():
            gpu = labels.get("gpu", "")
            # Holders from the same scrape as the used value: a vanished engine is not named.
            live = [holder for when, holder in holders.get(uuid, []) if abs(when - stamp) < 0.5]
            samples.append(
                GpuSample(
                    index=int(gpu) if gpu.isdigit() else None,
                    uuid=uuid,
                    pci_bus_id=labels.get("pci_bus_id", ""),
                    used_bytes=int(value),
                    age_seconds=max(0.0, now - stamp),
                    holders=tuple(sorted(live, key=lambda h: -h.used_bytes)),
                )
            )
        return samples


def _holder(name: str, labels: dict, value: int) -> Holder | None:
    if name == "gpu_residency_engine_memory_bytes":
        return Holder("engine", labels.get("engine", ""), value)
    if name == "gpu_residency_process_memory_bytes":
        name = f"pid {labels.get('pid', '?')} {labels.get('comm', '')}".strip()
        return Holder("process", name, value, engine=labels.get("engine", ""))
    if name == "gpu_residency_unattributed_memory_bytes":
        return Holder("unattributed", "", value)
    return None


# ---------- nvidia-smi ----------


class NvidiaSmiSource:
    """For hosts with neither an NVML binding nor Prometheus: the same query RLix runs today."""

    name = "nvidia-smi"

    def __init__(self, binary: str = "nvidia-smi", timeout: float = 5.0) -> None:
        import shutil

        path = shutil.which(binary)
        if path is None:
            raise SourceError(f"nvidia-smi source: {binary} not found on PATH")
        self._binary, self._timeout = path, timeout

    def read(self, node: str) -> list[GpuSample]:
        import subprocess

        command = [self._binary, "--query-gpu=index,uuid,pci.bus_id,memory.used", "--format=csv,noheader,nounits"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=self._timeout, check=False)
        except subprocess.TimeoutExpired:
            raise SourceError(f"nvidia-smi source: no answer in {self._timeout:.0f}s") from None
        if result.returncode != 0:
            raise SourceError(f"nvidia-smi source: exit {result.returncode}: {result.stderr.strip()[:200]}")
        samples = []
        for line in result.stdout.splitlines():
            fields = [field.strip() for field in line.split(",")]
            if len(fields) != 4 or not fields[0].isdigit() or not fields[3].isdigit():
                continue  # "[N/A]" and the like: no sample, so a request for that GPU blocks
            samples.append(GpuSample(int(fields[0]), fields[1], fields[2], int(fields[3]) * MIB))
        return samples
