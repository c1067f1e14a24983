"""The nvidia-smi source: for hosts with neither an NVML binding nor Prometheus."""

from __future__ import annotations

import math

from gate.readings import GpuSample, SourceError

MIB = 1024**2

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

    def read_used(self, node: str) -> list[GpuSample]:
        """Used memory only: one nvidia-smi run, what a wait repeats."""
        stdout = self._run("--query-gpu=index,uuid,pci.bus_id,memory.used")
        return [sample for line in stdout.splitlines() if (sample := parse_smi_line(line)) is not None]

    def read(self, node: str) -> list[GpuSample]:
        """With holders: the compute apps (a second run), attributed as the exporter does."""
        from gate.local_holders import with_holders

        samples = self.read_used(node)
        try:
            apps = parse_compute_apps(self._run("--query-compute-apps=gpu_uuid,pid,used_memory"))
        except SourceError:
            apps = None  # the GPUs were read; who holds them cannot be told
        processes = {s.uuid: None if apps is None else apps.get(s.uuid.lower(), {}) for s in samples}
        return with_holders(samples, processes, None)

    def _run(self, query: str) -> str:
        import subprocess

        command = [self._binary, query, "--format=csv,noheader,nounits"]
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
        return stdout


def parse_compute_apps(stdout: str) -> dict[str, dict[int, int | None]] | None:
    """uuid (lower case) -> {pid: bytes} from `--query-compute-apps=gpu_uuid,pid,used_memory`
    (MiB; "[N/A]" is a process whose memory is unknown). None when a line does not parse: a
    list that cannot be read whole says nothing about who holds what."""
    apps: dict[str, dict[int, int | None]] = {}
    for line in stdout.splitlines():
        if not line.strip() or line.strip().startswith("No running"):
            continue
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 3 or not fields[1].isdigit():
            return None
        used: int | None = None
        if fields[2] not in NOT_AVAILABLE:
            try:
                mib = float(fields[2])
            except ValueError:
                return None
            if not math.isfinite(mib) or mib < 0:
                return None
            used = round(mib * MIB)
        apps.setdefault(fields[0].lower(), {})[int(fields[1])] = used
    return apps
