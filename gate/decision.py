"""What one look at the GPUs decided, and how it is explained to a human."""

from __future__ import annotations

from dataclasses import dataclass, field

from gate.readings import GIB, GpuSample


@dataclass(frozen=True)
class GpuVerdict:
    requested: str
    sample: GpuSample | None
    clear: bool
    reason: str
    stale: bool = False  # the sample is too old to be believed

    @property
    def measured_bytes(self) -> int | None:
        """The GPU's used memory, when the gate believes the sample (present and fresh)."""
        return None if self.sample is None or self.stale else self.sample.used_bytes

    def describe(self, threshold_bytes: int) -> str:
        if self.sample is None or self.sample.used_bytes is None:
            return f"GPU {self.requested}: {self.reason}"
        used = self.sample.used_bytes / GIB
        line = f"GPU {self.requested}: {used:.2f} GiB used vs threshold {threshold_bytes / GIB:.2f} GiB"
        if not self.clear:
            line += f" ({self.reason})"
            # Engine totals and processes outside engines; an engine's processes are in its total.
            top = [h for h in self.sample.holders if not (h.kind == "process" and h.engine)]
            holders = ", ".join(str(h) for h in top[:3])
            if holders:
                line += f"; top holders: {holders}"
        return line


@dataclass(frozen=True)
class Decision:
    """One look at the GPUs: clear or not, and why."""

    ok: bool
    gpus: tuple[GpuVerdict, ...]
    threshold_bytes: int
    source: str
    reasons: tuple[str, ...] = field(default=())
    fail_open: bool = False  # cleared only because the source failed and fail-open was asked for
    waiting_for: str | None = None  # the engine whose release this wait is for

    @property
    def used_bytes(self) -> dict[str, int | None]:
        return {v.requested: (v.sample.used_bytes if v.sample else None) for v in self.gpus}

    @property
    def max_used_gb(self) -> float | None:
        """Max GiB over the requested GPUs; None unless every one was measured and fresh."""
        used = [v.measured_bytes for v in self.gpus]
        return max(used) / GIB if used and None not in used else None

    def explain(self) -> str:
        head = "clear" if self.ok else "blocked"
        if self.fail_open:
            head = "clear (fail-open: the source failed)"
        lines = [f"{head} [source={self.source}]", *self.reasons]
        if self.waiting_for and not self.ok:
            lines.append(self._release_line())
        lines += [v.describe(self.threshold_bytes) for v in self.gpus]
        return "\n".join(line for line in lines if line)

    def _release_line(self) -> str:
        """ "waiting for engine X's release: X still holds 9.4 GiB on GPU 3 (pid 4121 sglang::scheduler)"."""
        engine = self.waiting_for
        held = []
        for verdict in self.gpus:
            if verdict.sample is None:
                continue
            mine = [h for h in verdict.sample.holders if h.engine == engine and h.kind == "process"]
            whole = next((h for h in verdict.sample.holders if h.kind == "engine" and h.name == engine), None)
            total = whole.used_bytes if whole is not None else sum(h.used_bytes for h in mine)
            if total:
                who = ", ".join(f"pid {h.pid} {h.name}" if h.pid is not None else h.name for h in mine[:3])
                remarks = whole.remarks() if whole is not None else ""
                held.append(
                    f"{total / GIB:.1f} GiB on GPU {verdict.requested}" + (f" ({who})" if who else "") + remarks
                )
        if not held:
            unknown = [v.requested for v in self.gpus if v.sample is None or not v.sample.holders_known]
            if unknown:
                return (
                    f"waiting for engine {engine}'s release: cannot tell what it holds on GPU {', '.join(unknown)} "
                    f"(the {self.source} source did not list and attribute those GPUs' processes)"
                )
            return f"waiting for engine {engine}'s release: it holds nothing on these GPUs"
        return f"waiting for engine {engine}'s release: {engine} still holds " + "; ".join(held)


class GateTimeout(TimeoutError):
    """wait() ran out of time; `.decision` is the last look, with its explanation."""

    def __init__(self, decision: Decision, waited: float, held: str = "") -> None:
        """`held`: how far a clear streak got when time ran out ("clear on 1 of the 3 looks ...")."""
        why = f" ({held})" if held else ""
        super().__init__(f"GPUs not clear after {waited:.1f}s{why}: {decision.explain()}")
        self.decision = decision
        self.waited = waited
        self.held = held
