"""A fake NVML for machines without a GPU: build it, describe a node, rewrite it live.

The C library (fakenvml.c) is loaded by the real nvidia-ml-py binding as
``libnvidia-ml.so.1``; this module compiles it with the system C compiler and writes
the JSON scenario it reads. It serves the test suite and the exporter's ``--demo``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SOURCE = Path(__file__).with_name("fakenvml.c")
SONAME = "libnvidia-ml.so.1"
GIB = 1024**3

# NVML return codes a scenario injects (values from nvml.h).
NOT_SUPPORTED = 3
GPU_IS_LOST = 15
FUNCTION_NOT_FOUND = 13
LIBRARY_NOT_FOUND = 12


class BuildError(RuntimeError):
    """The fake library could not be compiled (no C compiler, or it failed)."""


def build(cache_dir: Path | None = None) -> Path:
    """Compile the fake library once per source version; return the directory holding it.

    The directory is what goes on LD_LIBRARY_PATH (or the file on --nvml.library).
    """
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    base = cache_dir or Path(tempfile.gettempdir()) / "gpu-residency-fakenvml"
    out_dir = base / digest
    lib = out_dir / SONAME
    if lib.exists():
        return out_dir
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise BuildError("no C compiler found (install gcc, or set CC)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{SONAME}.{os.getpid()}"
    cmd = [compiler, "-O2", "-shared", "-fPIC", f"-Wl,-soname,{SONAME}", "-o", str(tmp), str(SOURCE), "-lpthread"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"compiling the fake NVML failed:\n{result.stderr}")
    os.replace(tmp, lib)
    return out_dir


@dataclass
class FakeMig:
    """One MIG device (GPU instance `gi`, compute instance `ci`) of a FakeGpu with MIG on."""

    gi: int
    ci: int = 0
    profile: str = "1g.10gb"
    total: int = 10 * GIB
    used: int = 0
    reserved: int = 0
    processes: list[tuple[int, int]] = field(default_factory=list)
    slot: int | None = None  # its index for nvmlDeviceGetMigDeviceHandleByIndex (default: its position)
    errors: dict[str, int] = field(default_factory=dict)
    serial: int = 0  # tells apart instances re-created with the same ids (a new UUID, as on a real driver)

    def uuid_on(self, card: int) -> str:
        return f"MIG-{card:08x}-{self.gi:04x}-{self.ci:04x}-{self.serial:04x}-fake{card:08x}"

    def to_json(self, card: int, position: int) -> dict:
        return {
            "uuid": self.uuid_on(card),
            "gi": self.gi,
            "ci": self.ci,
            "profile": self.profile,
            "slot": position if self.slot is None else self.slot,
            "total": self.total,
            "used": self.used,
            "reserved": self.reserved,
            "processes": [{"pid": pid, "used": used} for pid, used in self.processes],
            "errors": self.errors,
        }


@dataclass
class FakeGpu:
    """One simulated GPU; memory in bytes, processes as (pid, used bytes) pairs."""

    index: int
    total: int = 80 * GIB
    used: int = 0
    reserved: int = 512 * 1024**2
    name: str = "NVIDIA H100 80GB HBM3"
    processes: list[tuple[int, int]] = field(default_factory=list)
    graphics_processes: list[tuple[int, int]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    delays_ms: dict[str, int] = field(default_factory=dict)  # call -> how long it takes
    hangs: set[str] = field(default_factory=set)  # calls that do not return while listed
    # The physical card (its UUID and bus id) when this view numbers it otherwise: a pod given
    # the host's GPUs 4-7 sees card 4 as its GPU 0.
    card: int | None = None
    mig_mode: int | None = None  # None: no MIG on this card (NOT_SUPPORTED); 0 off; 1 on
    mig: list[FakeMig] = field(default_factory=list)
    mig_max: int = 7

    @property
    def mig_uuids(self) -> list[str]:
        card = self.index if self.card is None else self.card
        return [instance.uuid_on(card) for instance in self.mig]

    @property
    def uuid(self) -> str:
        card = self.index if self.card is None else self.card
        return f"GPU-{card:08x}-fake-4000-8000-{card:012x}"

    @property
    def pci_bus_id(self) -> str:
        card = self.index if self.card is None else self.card
        return f"00000000:{0x18 + 0x10 * card:02X}:00.0"

    def to_json(self) -> dict:
        return {
            "uuid": self.uuid,
            "name": self.name,
            "pci_bus_id": self.pci_bus_id,
            "total": self.total,
            "used": self.used,
            "reserved": self.reserved,
            "processes": [{"pid": pid, "used": used} for pid, used in self.processes],
            "graphics_processes": [{"pid": pid, "used": used} for pid, used in self.graphics_processes],
            "errors": self.errors,
            "delays_ms": self.delays_ms,
            "hangs": {call: 1 for call in sorted(self.hangs)},
            **self._mig_json(),
        }

    def _mig_json(self) -> dict:
        if self.mig_mode is None:
            return {}
        card = self.index if self.card is None else self.card
        mig = [instance.to_json(card, position) for position, instance in enumerate(self.mig)]
        return {"mig_mode": self.mig_mode, "mig_max": self.mig_max, "mig": mig}


@dataclass
class Scenario:
    """A simulated node; ``write()`` replaces the file atomically so readers never see half."""

    path: Path
    gpus: list[FakeGpu] = field(default_factory=list)
    init_error: int = 0
    count_error: int = 0
    driver_version: str = "550.54.15"

    @classmethod
    def with_gpus(cls, path: Path, count: int) -> Scenario:
        return cls(path=Path(path), gpus=[FakeGpu(index=i) for i in range(count)])

    def write(self) -> None:
        body = {
            "driver_version": self.driver_version,
            "init_error": self.init_error,
            "count_error": self.count_error,
            "gpus": [gpu.to_json() for gpu in self.gpus],
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(body))
        os.replace(tmp, self.path)  # a new inode: the library notices the change

    def environ(self, lib_dir: Path) -> dict[str, str]:
        """Environment for a child process that should see this node through NVML."""
        env = dict(os.environ)
        env["FAKE_NVML_SCENARIO"] = str(self.path)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib_dir), env.get("LD_LIBRARY_PATH")]))
        return env
