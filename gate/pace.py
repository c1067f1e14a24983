"""How long a wait sleeps between looks."""

from __future__ import annotations

from gate.decision import Decision
from gate.settings import FALLING_BYTES


class Pace:
    """How long a wait sleeps before its next look: `fast` while the GPUs are close to clearing, or
    early in the wait (waits begin right after a release was announced), or while memory falls;
    otherwise, and while the source fails, twice as long each look, up to `slow`."""

    def __init__(self, fast: float, slow: float, eager_s: float, near_bytes: int) -> None:
        self.fast, self.slow, self.eager_s, self.near_bytes = fast, slow, eager_s, near_bytes
        self.delay = fast
        self._last_max: int | None = None

    def next(self, decision: Decision, elapsed: float) -> float:
        measured = [v.measured_bytes for v in decision.gpus]
        top = max(measured) if measured and None not in measured else None
        falling = top is not None and self._last_max is not None and top <= self._last_max - FALLING_BYTES
        self._last_max = top
        if top is not None and (elapsed < self.eager_s or top < self.near_bytes or falling):
            self.delay = self.fast
        else:  # far and steady, or nothing measured (a failing source is not hammered)
            self.delay = min(self.slow, max(self.fast, self.delay * 2))
        return self.delay
