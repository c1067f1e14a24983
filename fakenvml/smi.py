"""A small nvidia-smi over NVML (the fake library in tests): the queries RLix, miles and the gate run.

    nvidia-smi -L
    nvidia-smi [--id=0,1] --query-gpu=index,uuid,pci.bus_id,memory.used,memory.total,name --format=csv,noheader,nounits
    nvidia-smi --query-compute-apps=gpu_uuid,gpu_bus_id,pid,used_memory --format=csv,noheader,nounits
    nvidia-smi              the summary's "MIG devices" table only (GPU, GI, CI, MIG Dev, Memory-Usage)

With MIG on, `-L` lists each GPU's MIG devices under it ("  MIG 1g.10gb     Device  0: (UUID:
MIG-...)"), and the compute apps are the parent GPU's list (every device's processes, under the
GPU's UUID). Per-device memory is only in the summary's table: no --query-gpu field has it.

It answers from the same NVML the exporter reads, so a test's nvidia-smi, its NVML and its
exporter all describe one node. `install(directory)` writes it as an executable named
nvidia-smi (put that directory first on PATH).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pynvml

from fakenvml.interpreter import shebang_python
from gpu_residency_common.nvml_memory import read_memory
from gpu_residency_common.nvml_mig import MigLayouts

MIB = 1024**2


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _mib(value: int | None) -> str:
    return "[N/A]" if value is None else str(value // MIB)


def _gpu_fields(index: int, handle: object) -> dict[str, str]:
    try:
        memory = read_memory(pynvml, handle)  # v2, as today's nvidia-smi: used without the reserved part
        used, total = memory.used, memory.total
    except pynvml.NVMLError_NotSupported:
        used = total = None
    return {
        "index": str(index),
        "uuid": _text(pynvml.nvmlDeviceGetUUID(handle)),
        "pci.bus_id": _text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
        "name": _text(pynvml.nvmlDeviceGetName(handle)),
        "memory.used": _mib(used),
        "memory.total": _mib(total),
    }


def _apps(handle: object, uuid: str, bus: str) -> list[dict[str, str]]:
    return [
        {"gpu_uuid": uuid, "gpu_bus_id": bus, "pid": str(p.pid), "used_memory": _mib(p.usedGpuMemory)}
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    ]


def _mig_table(handles: dict[int, object]) -> str:
    """The summary's "MIG devices" block, as nvidia-smi draws it (two lines per device)."""
    rule = "+------------------+----------------------------------+-----------+-----------------------+"
    lines = [rule, "| MIG devices:" + " " * (len(rule) - 15) + " |", rule,
             "| GPU  GI  CI  MIG |                     Memory-Usage |        Vol|        Shared         |",
             "|      ID  ID  Dev |                       BAR1-Usage | SM     Unc| CE ENC  DEC  OFA  JPG |",
             "|==================+==================================+===========+=======================|"]  # fmt: skip
    for i, handle in handles.items():
        for n, mig in enumerate(MigLayouts().read(pynvml, i, handle, set()) or ()):
            usage = f"{_mib(mig.used_bytes)}MiB / {_mib(mig.total_bytes)}MiB"
            ids = f"{i:>2}{mig.instance.gpu_instance:>5}{mig.instance.compute_instance:>4}{n:>4}"
            lines += [f"| {ids}  |{usage:>33} | 14      0 |  1   0    1    0    1 |",
                      "|                  |                 0MiB / 16383MiB  |           |                       |",
                      rule]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    options = dict(arg.split("=", 1) for arg in args if arg.startswith("--") and "=" in arg)
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        ids = [int(i) for i in options["--id"].split(",")] if "--id" in options else list(range(count))
        if any(i >= count for i in ids):
            print("No devices were found")
            return 6
        handles = {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in ids}
        if "-L" in args:
            for i, handle in handles.items():
                fields = _gpu_fields(i, handle)
                print(f"GPU {i}: {fields['name']} (UUID: {fields['uuid']})")
                for n, mig in enumerate(MigLayouts().read(pynvml, i, handle, set()) or ()):
                    print(f"  MIG {mig.instance.profile:<12}Device {n:>2}: (UUID: {mig.instance.uuid})")
            return 0
        if not args:
            print(_mig_table(handles))
            return 0
        if "--query-gpu" in options:
            wanted = options["--query-gpu"].split(",")
            for i, handle in handles.items():
                fields = _gpu_fields(i, handle)
                print(", ".join(fields[name] for name in wanted))
            return 0
        if "--query-compute-apps" in options:
            wanted = options["--query-compute-apps"].split(",")
            for i, handle in handles.items():
                fields = _gpu_fields(i, handle)
                for app in _apps(handle, fields["uuid"], fields["pci.bus_id"]):
                    print(", ".join(app[name] for name in wanted))
            return 0
    except pynvml.NVMLError as exc:
        print(f"NVML error: {exc}", file=sys.stderr)
        return 9
    print("usage: nvidia-smi -L | --query-gpu=... | --query-compute-apps=...", file=sys.stderr)
    return 2


def install(directory: Path, library: Path | None = None, scenario: Path | None = None) -> Path:
    """An executable `nvidia-smi` in `directory` running this module (PYTHONPATH must reach fakenvml).
    With `library` and `scenario` it loads that NVML and node itself, as the real tool finds the
    driver's: the caller's own environment then need not reach NVML at all."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    setup = ""
    if library is not None:
        setup += f"import ctypes; ctypes.CDLL({str(library)!r})\n"  # pynvml's dlopen by soname finds it
    if scenario is not None:
        setup += f"import os; os.environ['FAKE_NVML_SCENARIO'] = {str(scenario)!r}\n"
    script.write_text(f"#!{shebang_python()}\nimport sys\n{setup}from fakenvml.smi import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return script


if __name__ == "__main__":
    raise SystemExit(main())
