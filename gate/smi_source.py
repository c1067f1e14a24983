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
