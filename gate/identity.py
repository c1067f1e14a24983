"""Which physical card the caller means.

NVML indices belong to a view: a pod given the host's GPUs 4-7 numbers them 0-3, while the
node's exporter (and so Prometheus) numbers every GPU 0-7. Only the UUID names a card
everywhere (the PCI bus id too, within a node). So the gate reads an index in the caller's
own view and asks a remote source (the exporter, Prometheus) by UUID. The caller's view, in
order of trust:

1. `NVIDIA_VISIBLE_DEVICES` listing UUIDs (what the device plugin sets): those cards, numbered
   in PCI bus order as NVML numbers them, ordered with the bus ids the source reports;
2. local NVML (nvidia-ml-py and the driver's library): index -> UUID outright;
3. `nvidia-smi -L`: the same, from the tool;
4. `NVIDIA_VISIBLE_DEVICES` listing host indices (`4,5,6,7`): those, in order.

`NVIDIA_VISIBLE_DEVICES=all` proves nothing (base images set it whatever the pod was given), so
it is no view. Without a view, an index asked of a remote source is refused with how to name
the GPU instead. `CUDA_VISIBLE_DEVICES` renumbers CUDA ordinals, not NVML's: the gate takes
NVML indices, as nvidia-smi and RLix's probe do.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from dataclasses import dataclass

from gate.readings import GpuSample, SourceError, split_instance

VISIBLE_ENV = "NVIDIA_VISIBLE_DEVICES"
SMI_LIST = re.compile(r"^GPU (\d+): .*\(UUID: (GPU-[0-9A-Za-z-]+)\)\s*$")
HOW_TO_NAME = (
    "name the GPU by UUID (GPU-...; `nvidia-smi -L` in this container lists them) or PCI bus id, "
    "or run where NVML, nvidia-smi or $NVIDIA_VISIBLE_DEVICES shows this container's GPUs"
)


class UnresolvedGpu(ValueError):
    """An index that names no card in the caller's view, or a view that cannot be read."""


@dataclass(frozen=True)
class LocalView:
    """How this process numbers its GPUs, and where that was read."""

    how: str
    uuids: dict[int, str] | None = None  # index -> UUID, known outright (NVML, nvidia-smi -L)
    visible_uuids: tuple[str, ...] = ()  # the cards this container has, numbered by PCI bus order
    host_indices: tuple[int, ...] = ()  # the host's indices of this container's cards

    def uuid_of(self, index: int, samples: list[GpuSample] | None) -> str:
        """The UUID of the card this view numbers `index`; `samples` (the source's) order visible
        UUIDs by bus id and name host indices. SourceError when they lack a card of this view."""
        if self.uuids is not None:
            if index not in self.uuids:
                raise UnresolvedGpu(f"GPU {index}: no such GPU in this process's view ({self.how})")
            return self.uuids[index]
        count = len(self.visible_uuids) or len(self.host_indices)
        if index >= count:
            raise UnresolvedGpu(f"GPU {index}: this container has {count} GPU(s) ({self.how})")
        if samples is None:
            raise LookupError("the source's samples are needed to number the visible GPUs")
        if self.visible_uuids:
            buses = {s.uuid.lower(): s.pci_bus_id.lower() for s in samples}
            missing = [u for u in self.visible_uuids if u.lower() not in buses]
            if missing:
                raise SourceError(f"GPU {index}: {missing[0]} ({self.how}) is not among the source's GPUs")
            return sorted(self.visible_uuids, key=lambda u: buses[u.lower()])[index]
        host = sorted(self.host_indices)[index]
        found = [s.uuid for s in samples if s.index == host]
        if len(found) != 1:
            raise SourceError(f"GPU {index}: host GPU {host} ({self.how}) is not among the source's GPUs")
        return found[0]

    @property
    def needs_samples(self) -> bool:
        return self.uuids is None


def parse_visible(value: str | None) -> LocalView | None:
    """A view from $NVIDIA_VISIBLE_DEVICES: UUIDs or host indices; none for all/none/void/unset."""
    items = [item.strip() for item in (value or "").split(",") if item.strip()]
    if not items or items[0].lower() in ("all", "none", "void"):
        return None
    if all(item.upper().startswith("GPU-") for item in items):
        return LocalView(f"{VISIBLE_ENV}={value}", visible_uuids=tuple(items))
    if all(item.isdigit() for item in items):
        return LocalView(f"{VISIBLE_ENV}={value}", host_indices=tuple(int(item) for item in items))
    return None  # MIG ids or something else: not a view of whole GPUs


def parse_smi_list(text: str) -> dict[int, str]:
    """index -> UUID from `nvidia-smi -L` ("GPU 0: NVIDIA H100 (UUID: GPU-...)"); MIG lines are skipped."""
    found = {}
    for line in text.splitlines():
        match = SMI_LIST.match(line.strip())
        if match:
            found[int(match.group(1))] = match.group(2)
    return found


def _nvml_view(timeout: float) -> LocalView | None:
    from gate.nvml_source import NvmlSource

    try:
        samples = NvmlSource.shared(timeout).read_used("")
    except SourceError:
        return None
    return LocalView("local NVML", uuids={s.index: s.uuid for s in samples if s.index is not None})


def _smi_view(timeout: float) -> LocalView | None:
    import shutil

    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        result = subprocess.run([binary, "-L"], capture_output=True, timeout=timeout, check=False)
    except (subprocess.SubprocessError, OSError):
        return None
    uuids = parse_smi_list(result.stdout.decode("utf-8", "replace")) if result.returncode == 0 else {}
    return LocalView("nvidia-smi -L", uuids=uuids) if uuids else None


_smi_cache: dict[str, LocalView | None] = {}
_smi_lock = threading.Lock()


def local_view(timeout: float = 5.0) -> LocalView | None:
    """This process's view of its GPUs (see the module's docstring), or None when none can be read.
    nvidia-smi's answer is kept for the process's life: a process's cards do not change."""
    visible = parse_visible(os.environ.get(VISIBLE_ENV))
    if visible is not None and visible.visible_uuids:
        return visible
    view = _nvml_view(timeout)
    if view is not None and view.uuids:
        return view
    with _smi_lock:
        if "view" not in _smi_cache:
            _smi_cache["view"] = _smi_view(timeout)
        view = _smi_cache["view"]
    return view or visible


def resolve(names: list[str], view: LocalView | None, samples: list[GpuSample] | None) -> list[str]:
    """`names` with every index replaced by the UUID of that card in the caller's view; UUIDs and
    bus ids are kept. UnresolvedGpu when an index cannot be read; LookupError when the view
    needs the source's samples and none were given."""
    resolved = []
    for name in names:
        parent, gi = split_instance(name)
        if gi is not None and parent.isdigit():  # `gpu:gi` on an index: the index is this view's
            resolved.append(f"{resolve([parent], view, samples)[0]}:{gi}")
            continue
        if not name.isdigit():
            resolved.append(name)
            continue
        if view is None:
            raise UnresolvedGpu(
                f"GPU {name} is an index, and this process's view of its GPUs cannot be read: " + HOW_TO_NAME
            )
        resolved.append(view.uuid_of(int(name), samples))
    return resolved
