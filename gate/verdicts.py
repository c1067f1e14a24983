"""One GPU's verdict from the source's samples: measured, fresh, under the threshold, unambiguous."""

from __future__ import annotations

from gate.decision import GpuVerdict
from gate.readings import GIB, GpuSample


def verdict(name: str, target: str, samples: list[GpuSample], threshold_bytes: int, max_age_s: float) -> GpuVerdict:
    """The freshest reading of the card decides; another fresh reading of it (an HA replica, a
    second scrape job) that would decide otherwise makes the card ambiguous, which blocks.
    `name` is what the caller asked for, `target` what it matches in the samples."""
    found = [s for s in samples if s.matches(target)]
    cards = {_memory_of(s) for s in found}
    if not found or len(cards) > 1:
        reason = "no sample for this GPU" if not found else f"ambiguous: matches {len(cards)} GPUs"
        return GpuVerdict(name, None, False, reason)
    copies = sorted(found, key=lambda s: s.age_seconds or 0.0)
    judged = [judge(name, copy, threshold_bytes, max_age_s) for copy in copies]
    rivals = [j.sample for j in judged[1:] if not j.stale and j.clear != judged[0].clear]
    if judged[0].stale or not rivals:
        return judged[0]
    readings = "; ".join(_reading(c) for c in [copies[0], *rivals])
    # Blocked either way; the reading it carries is the highest, so a caller that only takes the
    # figure (the RLix probe) errs towards "held".
    highest = max([copies[0], *rivals], key=lambda c: -1 if c.used_bytes is None else c.used_bytes)
    return GpuVerdict(name, highest, False, f"ambiguous: fresh readings of this GPU disagree: {readings}")


def _memory_of(sample: GpuSample) -> str:
    """What holds the sample's memory: the card, or a MIG device's GPU instance (its compute
    instances, each a MIG device of its own, report that one memory alike)."""
    if sample.gpu_instance is not None:
        return f"{sample.parent_uuid.lower()}:{sample.gpu_instance}"
    return sample.uuid.lower() or sample.pci_bus_id.lower()


def judge(name: str, sample: GpuSample, threshold_bytes: int, max_age_s: float) -> GpuVerdict:
    """One reading alone: stale, unmeasured, over or under the threshold."""
    if sample.age_seconds is not None and sample.age_seconds > max_age_s:
        reason = f"stale: last sample {sample.age_seconds:.1f}s old > {max_age_s:g}s"
        return GpuVerdict(name, sample, False, reason, stale=True)
    if sample.used_bytes is None:
        return GpuVerdict(name, sample, False, "used memory not available ([N/A])")
    if sample.used_bytes >= threshold_bytes:
        return GpuVerdict(name, sample, False, "over threshold")
    return GpuVerdict(name, sample, True, "under threshold")


def _reading(sample: GpuSample) -> str:
    """ "replica=r2: 0.50 GiB, 12.0s old": one copy among several readings of a GPU."""
    origin = ",".join(f"{k}={v}" for k, v in sample.origin) or "a copy"
    used = "[N/A]" if sample.used_bytes is None else f"{sample.used_bytes / GIB:.2f} GiB"
    age = "" if sample.age_seconds is None else f", {sample.age_seconds:.1f}s old"
    return f"{origin}: {used}{age}"
