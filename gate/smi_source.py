"""The nvidia-smi source: for hosts with neither an NVML binding nor Prometheus."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time

from gate.identity import SMI_LIST
from gate.readings import GpuSample, SourceError

MIB = 1024**2
# `nvidia-smi -L`: a GPU, then its MIG devices indented under it.
SMI_MIG = re.compile(r"^\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: (MIG-[0-9A-Za-z-]+)\)\s*$")
# The summary's "MIG devices" table: GPU, GI, CI, MIG Dev | used MiB / total MiB.
MIG_ROW = re.compile(r"^\|\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*\|\s*(\d+)MiB\s*/\s*(\d+)MiB\s*\|")
MIG_LIST_MAX_AGE = 30.0  # seconds `nvidia-smi -L` is trusted for which MIG devices exist


def parse_mig_list(text: str) -> dict[tuple[int, int], tuple[str, str]]:
    """(GPU index, MIG device index) -> (MIG UUID, parent GPU UUID) from `nvidia-smi -L`."""
    found, parent = {}, None
    for line in text.splitlines():
        if gpu := SMI_LIST.match(line.strip()):
            parent = (int(gpu.group(1)), gpu.group(2))
        elif (mig := SMI_MIG.match(line)) and parent is not None:
            found[(parent[0], int(mig.group(2)))] = (mig.group(3), parent[1])
    return found


def parse_mig_table(text: str, devices: dict[tuple[int, int], tuple[str, str]]) -> list[GpuSample]:
    """A sample per row of the summary's MIG devices table whose device `-L` named."""
    samples = []
    for line in text.splitlines():
        row = MIG_ROW.match(line.strip())
        if row is None:
            continue
        gpu, gi, _ci, dev, used = (int(row.group(n)) for n in range(1, 6))
        if (gpu, dev) in devices:
            uuid, parent = devices[(gpu, dev)]
            samples.append(GpuSample(gpu, uuid, "", used * MIB, parent_uuid=parent, gpu_instance=gi))
    return samples


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
    reads_mig = True  # per-device memory from the summary's MIG table, UUIDs from `-L`
    poll_floor_s = 0.5  # a process per look: RLix's pace, never faster

    def __init__(self, binary: str = "nvidia-smi", timeout: float = 5.0) -> None:
        import shutil

        path = shutil.which(binary)  # only an executable file counts
        if path is None:
            raise SourceError(f"nvidia-smi source: {binary} not found on PATH")
        self._binary, self._timeout = path, timeout
        self._mig: tuple[float, dict[tuple[int, int], tuple[str, str]]] | None = None  # (read at, `-L` devices)
        self._with_mig = False

    def include_mig(self) -> None:
        """MIG devices are asked for: read them too (two more runs; otherwise one run a look, as RLix's)."""
        self._with_mig = True

    def read_used(self, node: str) -> list[GpuSample]:
        """Used memory only: one nvidia-smi run, what a wait repeats. Once MIG devices are asked for
        (include_mig), on a node that has some a second (the summary's MIG table), and `-L` every
        MIG_LIST_MAX_AGE seconds for their UUIDs."""
        stdout = self._run("--query-gpu=index,uuid,pci.bus_id,memory.used")
        samples = [sample for line in stdout.splitlines() if (sample := parse_smi_line(line)) is not None]
        if not self._with_mig:
            return samples
        # MIG devices are extra: when their reads fail, a request for one finds no sample and blocks.
        if self._mig is None or time.monotonic() - self._mig[0] > MIG_LIST_MAX_AGE:
            try:
                listed = parse_mig_list(self._run("-L", csv=False))
            except SourceError:
                listed = {}  # asked again after MIG_LIST_MAX_AGE, not every look
            self._mig = (time.monotonic(), listed)
        with contextlib.suppress(SourceError):
            if self._mig[1]:
                buses = {s.uuid: s.pci_bus_id for s in samples}
                devices = parse_mig_table(self._run(csv=False), self._mig[1])
                samples += [dataclasses.replace(d, pci_bus_id=buses.get(d.parent_uuid, "")) for d in devices]
        return samples

    def read(self, node: str) -> list[GpuSample]:
        """With holders: the compute apps (a second run), attributed as the exporter does."""
        from gate.local_holders import with_holders

        samples = self.read_used(node)
        try:
            apps = parse_compute_apps(self._run("--query-compute-apps=gpu_uuid,pid,used_memory"))
        except SourceError:
            apps = None  # the GPUs were read; who holds them cannot be told
        # A MIG device's processes are listed under its GPU: who holds the device cannot be told.
        processes = {
            s.uuid: None if apps is None or s.gpu_instance is not None else apps.get(s.uuid.lower(), {})
            for s in samples
        }
        return with_holders(samples, processes, None)

    def _run(self, *query: str, csv: bool = True) -> str:
        import subprocess

        command = [self._binary, *query, *(["--format=csv,noheader,nounits"] if csv else [])]
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
