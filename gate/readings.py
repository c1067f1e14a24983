"""What a source returns and how a requested GPU name matches a GPU."""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1024**3
MIB = 1024**2
# The growth per cycle GpuEngineResidualCreeping fires at (dashboards/alerts.yaml): above what +-50 MiB
# of noise can fake. A test keeps the two equal.
CREEP_BYTES_PER_CYCLE = 32 * MIB


class SourceError(RuntimeError):
    """The source could not answer at all (unreachable, no library, bad response)."""


@dataclass(frozen=True)
class Holder:
    """Who holds memory on a GPU: an engine, a process, or 'unattributed'."""

    kind: str  # engine | process | unattributed
    name: str  # an engine's name; a process's holder (ray::MegatronTrainRayActor, torchrun-4120, its comm)
    used_bytes: int
    engine: str = ""  # for a process: the engine it belongs to ("" for none)
    pid: int | None = None
    role: str = ""  # for a process: its holder's kind (trainer, ray, vllm, sglang, process)
    # For an engine: how much more each of its releases leaves on this GPU (the exporter's trend), if known.
    growth_bytes_per_cycle: float | None = None
    # For an engine: the resources its own report cannot say were released (vLLM's `unknown`).
    unknown_resources: tuple[str, ...] = ()

    def __str__(self) -> str:
        used = f"{self.used_bytes / GIB:.1f} GiB"
        if self.kind == "process":
            pid = f" pid {self.pid}" if self.pid is not None else ""
            return f"{self.role or 'process'} {self.name}{pid}: {used}"
        return f"{self.kind} {self.name}: {used}{self.remarks()}" if self.name else f"{self.kind}: {used}"

    def remarks(self) -> str:
        """What else is known of an engine's hold, e.g. " (creeping: each release leaves 120 MiB more)"
        or " (its weights state unknown after a failed sleep or wake: counted as held)"; else ""."""
        out = ""
        growth = self.growth_bytes_per_cycle
        if growth is not None and growth > CREEP_BYTES_PER_CYCLE:
            out += f" (creeping: each release leaves {growth / MIB:.0f} MiB more)"
        if self.unknown_resources:
            what = " and ".join(self.unknown_resources)
            out += f" (its {what} state unknown after a failed sleep or wake: counted as held)"
        return out


@dataclass(frozen=True)
class GpuSample:
    index: int | None
    uuid: str
    pci_bus_id: str
    used_bytes: int | None  # None: the GPU answered but cannot say (nvidia-smi's "[N/A]", NVML's NOT_SUPPORTED)
    age_seconds: float | None = None  # None: read just now (local sources)
    holders: tuple[Holder, ...] = field(default=())
    # Where this reading came from when a source holds several of one GPU (HA replicas, two scrape
    # jobs): the labels that tell the copies apart, e.g. (("replica", "r2"),). Empty for one copy.
    origin: tuple[tuple[str, str], ...] = field(default=())
    # The source listed this GPU's processes and named their engines: an engine absent from
    # `holders` really holds nothing here. False: it cannot tell.
    holders_known: bool = False
    # A MIG device: its parent GPU's UUID and its GPU instance id; `uuid` is its own MIG-... id,
    # `index` and `pci_bus_id` its parent's. Empty/None for a whole GPU.
    parent_uuid: str = ""
    gpu_instance: int | None = None

    def matches(self, name: str) -> bool:
        """A GPU is named by its NVML index, UUID or PCI bus id (any case, short bus id too); a
        MIG device by its MIG-... UUID or `gpu:gi` (its parent's index or UUID, its GPU instance)."""
        text = name.strip()
        lowered = text.lower()
        if lowered.startswith("mig-"):
            return self.uuid.lower() == lowered
        parent, gi = split_instance(text)
        if gi is not None:
            return self.gpu_instance == gi and self._names_gpu(parent, self.parent_uuid)
        return self.gpu_instance is None and self._names_gpu(text, self.uuid)

    def _names_gpu(self, text: str, uuid: str) -> bool:
        if text.isdigit():
            return self.index == int(text)
        lowered = text.lower()
        if lowered.startswith("gpu-"):
            return uuid.lower() == lowered
        bus = self.pci_bus_id.lower()
        return bool(bus) and (bus == lowered or (bus.endswith(lowered) and ":" in lowered))


def split_instance(name: str) -> tuple[str, int | None]:
    """`gpu:gi` (an index or GPU-... UUID, then a GPU instance id) -> (gpu, gi); else (name, None).
    A PCI bus id has colons too, but never ends in digits after one with a GPU before it."""
    head, _, tail = name.strip().rpartition(":")
    if tail.isdigit() and (head.isdigit() or head.lower().startswith("gpu-")):
        return head, int(tail)
    return name.strip(), None


def names_mig(name: str) -> bool:
    """A MIG device's name: MIG-... or `gpu:gi`."""
    return name.strip().lower().startswith("mig-") or split_instance(name)[1] is not None


def refuse_mig(name: str, where: str) -> None:
    """ValueError for a MIG name where MIG devices are not read yet (`where`: the source or API)."""
    if names_mig(name):
        raise ValueError(
            f"GPU {name.strip()}: MIG instances are not supported by {where} yet (only the nvml source reads them); "
            "name the parent GPU (its GPU-... UUID)"
        )


def normalise(gpu: int | str) -> str:
    if isinstance(gpu, bool) or not isinstance(gpu, int | str):
        raise ValueError(f"GPU {gpu!r}: give an index, a UUID or a PCI bus id")
    text = str(gpu).strip()
    if not text or (isinstance(gpu, int) and gpu < 0):
        raise ValueError(f"GPU {gpu!r}: give an index, a UUID or a PCI bus id")
    return text
