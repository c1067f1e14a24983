"""Holders for the local sources (NVML, nvidia-smi), named as the exporter names them.

A gate that reads the GPUs itself must say who holds them the way the exporter's own
answer does: registered engines (from the registry, their roots resolved across PID
namespaces by NSpid and start time) with their whole tree's memory, every other process
by its holder (Ray actor, trainer rank, title), and what no listed process accounts for.
The exporter's attribution runs here on the processes the source listed; it needs only
the standard library.
"""

from __future__ import annotations

from gate.readings import GpuSample, Holder

# uuid -> {pid: used bytes or None}, or None when the GPU's process list could not be read
ProcessLists = dict[str, dict[int, int | None] | None]


def with_holders(samples: list[GpuSample], processes: ProcessLists, registry: str | None) -> list[GpuSample]:
    """`samples` with their holders and holders_known filled in from `processes`."""
    import dataclasses

    from exporter.engines.catalog import EngineCatalog
    from exporter.engines.registry import registry_dir
    from exporter.errors import ErrorCounter
    from exporter.snapshot.attribution import Attributor
    from exporter.sources.nvml import GpuProcess, GpuReading, NvmlReading
    from exporter.sources.proctable import ProcView

    readings = []
    for sample in samples:
        listed = processes.get(sample.uuid)
        readings.append(
            GpuReading(
                index=sample.index if sample.index is not None else -1,
                uuid=sample.uuid,
                pci_bus_id=sample.pci_bus_id,
                model="",
                used_bytes=sample.used_bytes,
                total_bytes=None,
                reserved_bytes=None,
                processes=None if listed is None else tuple(GpuProcess(p, u) for p, u in listed.items()),
            )
        )
    errors = ErrorCounter()
    catalog = EngineCatalog(errors, registry_dir(registry), discover=False)
    catalog.resolve(ProcView(errors))  # asks for the roots registered from other PID namespaces
    catalog.scan()  # finds them (a pass over /proc only when some are wanted)
    view = ProcView(errors)
    snapshot = Attributor(errors).attribute(NvmlReading(True, tuple(readings)), catalog.resolve(view), view)
    holders: dict[str, list[Holder]] = {}
    for usage in snapshot.engine_usage:
        if usage.used_bytes is not None:
            holders.setdefault(usage.gpu.uuid, []).append(Holder("engine", usage.engine, usage.used_bytes))
    for proc in snapshot.processes:
        if proc.used_bytes is None:
            continue
        # An engine's process is named by its title (its holder is the engine); any other by its holder.
        name = proc.comm if proc.engine else proc.holder.name or proc.comm
        holders.setdefault(proc.gpu.uuid, []).append(
            Holder("process", name, proc.used_bytes, engine=proc.engine, pid=proc.pid, role=proc.holder.kind)
        )
    for gpu, rest in snapshot.unattributed:
        holders.setdefault(gpu.uuid, []).append(Holder("unattributed", "", rest))
    return [
        dataclasses.replace(
            sample,
            holders=tuple(sorted(holders.get(sample.uuid, ()), key=lambda h: -h.used_bytes)),
            holders_known=processes.get(sample.uuid) is not None,
        )
        for sample in samples
    ]
