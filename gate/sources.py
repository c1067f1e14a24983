"""Where the gate reads whole-GPU used memory: local NVML, Prometheus, or nvidia-smi.

Each source returns every GPU of the node as GpuSample or raises SourceError; the gate
picks the requested GPUs. Nothing here is imported until a source is built, so
`import gate` stays free of pynvml (and everything else outside the standard library).
"""

from __future__ import annotations

import json
import math
import threading
from typing import ClassVar, Protocol

from gate.readings import GpuSample, Holder, SourceError
from gpu_residency_common.deadline import DeadlineExceeded, DeadlineRunner
from gpu_residency_common.nvml_memory import read_memory

MIB = 1024**2
DEFAULT_NVML_TIMEOUT_S = 5.0


class Source(Protocol):
    """What every source has. A source may also have (the gate uses them when present):

    - `read_used(node)`: like read(), used memory only (no holders), cheap enough to repeat
      every few milliseconds while a wait is close to clearing;
    - `wait_until_under(node, names, threshold_bytes, timeout)`: one long poll, answered as
      soon as every named GPU is under the threshold or at `timeout`, with the samples;
    - `poll_floor_s`: the shortest sensible time between two looks (a process per look,
      a scrape interval behind the data)."""

    name: str

    def read(self, node: str) -> list[GpuSample]: ...


# ---------- local NVML ----------


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


SAMPLE_TIME_LABEL = "gate_field"  # marks the series that carry each GPU's sample time


def build_query(node: str) -> str:
    """One instant query for a poll: the node's used, engine, process and unattributed memory, and
    the time of each GPU's used sample (timestamp(), tagged so `or` keeps it beside the value).

    An instant query honours Prometheus' own staleness: once the exporter's target is down (or a
    series vanished), its series are absent rather than their last value."""
    names = "|".join(METRICS)
    node_literal = escape_label_value(node)
    return (
        f'{{__name__=~"{names}",node="{node_literal}"}} or label_replace(timestamp('
        f'gpu_residency_memory_used_bytes{{node="{node_literal}"}}), "{SAMPLE_TIME_LABEL}", "sample_time", "", "")'
    )


class PrometheusSource:
    """One instant query per poll against the Prometheus HTTP API; samples carry their age."""

    name = "prometheus"
    poll_floor_s = 0.1  # its data changes once per scrape interval; faster looks only load Prometheus

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        import urllib.parse  # here, not at the top: `import gate` stays fast where this source is unused

        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SourceError(f"prometheus source: {url!r} is not an http(s) URL")
        self._endpoint = url.rstrip("/") + "/api/v1/query"
        self._timeout = timeout

    def read(self, node: str) -> list[GpuSample]:
        import urllib.error
        import urllib.parse
        import urllib.request

        body = urllib.parse.urlencode({"query": build_query(node)}).encode()
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
        except (ValueError, RecursionError):
            raise SourceError(f"prometheus source: {self._endpoint} did not answer JSON") from None
        return samples_from_answer(payload)

    @staticmethod
    def _samples(result: list) -> list[GpuSample]:
        """Samples from an instant query's result; KeyError/TypeError/ValueError/IndexError on a bad shape."""
        used: dict[str, tuple[dict, float]] = {}
        sampled_at: dict[str, float] = {}
        evaluated_at = 0.0
        holders: dict[str, list[Holder]] = {}
        for series in result:
            labels = series["metric"]
            stamp, value = float(series["value"][0]), float(series["value"][1])
            evaluated_at = max(evaluated_at, stamp)
            if not math.isfinite(value):
                continue
            name, uuid = labels.get("__name__"), labels.get("uuid", "")
            if labels.get(SAMPLE_TIME_LABEL) == "sample_time":
                sampled_at[uuid] = value
            elif name == "gpu_residency_memory_used_bytes":
                used[uuid] = (labels, value)
            else:
                holder = _holder(name, labels, int(value))
                if holder is not None:
                    holders.setdefault(uuid, []).append(holder)
        samples = []
        for uuid, (labels, value) in used.items():
            gpu = labels.get("gpu", "")
            # Age against Prometheus' own evaluation time: no clock skew between this host and it.
            age = evaluated_at - sampled_at[uuid] if uuid in sampled_at else math.inf
            samples.append(
                GpuSample(
                    index=int(gpu) if gpu.isdigit() else None,
                    uuid=uuid,
                    pci_bus_id=labels.get("pci_bus_id", ""),
                    used_bytes=int(value),
                    age_seconds=max(0.0, age),
                    holders=tuple(sorted(holders.get(uuid, []), key=lambda h: -h.used_bytes)),
                )
            )
        return samples


def samples_from_answer(payload: object) -> list[GpuSample]:
    """The samples in a Prometheus /api/v1/query answer; SourceError for anything else."""
    if not isinstance(payload, dict):
        raise SourceError("prometheus source: query failed: unexpected answer")
    data = payload.get("data")
    if payload.get("status") != "success" or not isinstance(data, dict) or data.get("resultType") != "vector":
        raise SourceError(f"prometheus source: query failed: {payload.get('error', 'unexpected answer')}")
    try:
        return PrometheusSource._samples(data["result"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
        raise SourceError(f"prometheus source: unexpected answer: {exc!r}") from None


def _holder(name: str, labels: dict, value: int) -> Holder | None:
    if name == "gpu_residency_engine_memory_bytes":
        return Holder("engine", labels.get("engine", ""), value)
    if name == "gpu_residency_process_memory_bytes":
        pid, engine = labels.get("pid", ""), labels.get("engine", "")
        # An engine's process is named by its title (its holder is the engine); any other by its holder.
        return Holder(
            "process",
            labels.get("comm", "") if engine else labels.get("holder") or labels.get("comm", ""),
            value,
            engine=engine,
            pid=int(pid) if pid.isdigit() else None,
            role=labels.get("holder_kind", ""),
        )
    if name == "gpu_residency_unattributed_memory_bytes":
        return Holder("unattributed", "", value)
    return None


# ---------- nvidia-smi ----------


# What nvidia-smi prints in a field the GPU answers but has no figure for.
NOT_AVAILABLE = ("[N/A]", "N/A", "[Not Supported]", "Not Supported")


def parse_smi_line(line: str) -> GpuSample | None:
    """One line of `--query-gpu=index,uuid,pci.bus_id,memory.used --format=csv,noheader,nounits`.

    Memory is MiB, possibly fractional; "[N/A]" gives a sample without a figure. Anything
    else that is not a finite, non-negative number gives no sample: that GPU cannot be read."""
    fields = [field.strip() for field in line.split(",")]
    if len(fields) != 4 or not fields[0].isdigit():
        return None
    index, uuid, bus, used = int(fields[0]), fields[1], fields[2], fields[3]
    if used in NOT_AVAILABLE:
        return GpuSample(index, uuid, bus, None)
    try:
        mib = float(used)
    except ValueError:
        return None
    if not math.isfinite(mib) or mib < 0:
        return None
    return GpuSample(index, uuid, bus, round(mib * MIB))


class NvidiaSmiSource:
    """For hosts with neither an NVML binding nor Prometheus: whole-GPU memory.used, as RLix reads it today."""

    name = "nvidia-smi"
    poll_floor_s = 0.5  # a process per look: RLix's pace, never faster

    def __init__(self, binary: str = "nvidia-smi", timeout: float = 5.0) -> None:
        import shutil

        path = shutil.which(binary)  # only an executable file counts
        if path is None:
            raise SourceError(f"nvidia-smi source: {binary} not found on PATH")
        self._binary, self._timeout = path, timeout

    def read(self, node: str) -> list[GpuSample]:
        import subprocess

        command = [self._binary, "--query-gpu=index,uuid,pci.bus_id,memory.used", "--format=csv,noheader,nounits"]
        try:
            result = subprocess.run(command, capture_output=True, timeout=self._timeout, check=False)
        except subprocess.TimeoutExpired:
            raise SourceError(f"nvidia-smi source: no answer in {self._timeout:g}s") from None
        except OSError as exc:  # vanished, not executable after all, not a program (ENOEXEC)
            raise SourceError(f"nvidia-smi source: cannot run {self._binary}: {exc.strerror or exc}") from None
        # Bytes that are not UTF-8 become U+FFFD: such a field does not parse, that GPU has no sample.
        stdout, stderr = (stream.decode("utf-8", "replace") for stream in (result.stdout, result.stderr))
        if result.returncode != 0:
            detail = (stderr.strip() or stdout.strip())[:200]
            raise SourceError(f"nvidia-smi source: exit {result.returncode}" + (f": {detail}" if detail else ""))
        return [sample for line in stdout.splitlines() if (sample := parse_smi_line(line)) is not None]
