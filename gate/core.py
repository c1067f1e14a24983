"""ResidualGate: may a side wake onto these GPUs? Only when each one's whole-GPU used memory
is under the threshold, measured and fresh.

Fail-closed: no data, stale data or an unreachable source blocks, with the reason. The
gate never sleeps a grace period and lets the wake-up go ahead on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gate.decision import Decision, GateTimeout, GpuVerdict
from gate.pace import Pace
from gate.readings import GIB, GpuSample, SourceError, normalise
from gate.settings import (
    CLEAR_SAMPLES_ENV,
    DEFAULT_EAGER_S,
    DEFAULT_FAST_POLL_S,
    DEFAULT_MAX_AGE_S,
    DEFAULT_NEAR_GB,
    DEFAULT_THRESHOLD_GB,
    EXPORTER_ENV,
    FAIL_OPEN_ENV,
    LEGACY_THRESHOLD_ENV,
    LONG_POLL_S,
    MAX_AGE_ENV,
    PROMETHEUS_ENV,
    REGISTRY_ENV,
    SOURCE_ENV,
    THRESHOLD_ENV,
    GateConfigError,
    default_node,
    env_number,
    parse_threshold,
)
from gate.sources import Source, build_source
from gpu_residency_common.files import ensure_dir, write_atomic


class ResidualGate:
    def __init__(
        self,
        threshold_gb: float = DEFAULT_THRESHOLD_GB,
        source: Source | str = "auto",
        prometheus_url: str | None = None,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        fail_open: bool = False,
        clear_samples: int = 1,
        poll_s: float = 0.5,
        record_dir: str | os.PathLike | None = None,
        exporter_url: str | None = None,
        exporter_options: dict | None = None,
        fast_poll_s: float = DEFAULT_FAST_POLL_S,
        eager_s: float = DEFAULT_EAGER_S,
        near_gb: float = DEFAULT_NEAR_GB,
    ) -> None:
        """`poll_s`: the longest a wait sleeps between looks (far from clearing); `fast_poll_s`: the
        shortest, used for `eager_s` seconds after the wait starts, while the max used is within
        `near_gb` of the threshold, and while it falls. A source's own floor (`poll_floor_s`:
        0.5 s for nvidia-smi, 0.1 s for Prometheus) raises `fast_poll_s`."""
        self.threshold_bytes = int(parse_threshold(threshold_gb, "threshold_gb") * GIB)
        if not max_age_s > 0:
            raise GateConfigError(f"max_age_s={max_age_s!r} must be > 0")
        if isinstance(clear_samples, bool) or not isinstance(clear_samples, int) or clear_samples < 1:
            raise GateConfigError(f"clear_samples={clear_samples!r} must be an integer >= 1")
        for name, value in (("poll_s", poll_s), ("fast_poll_s", fast_poll_s)):
            if not value > 0:
                raise GateConfigError(f"{name}={value!r} must be > 0")
        for name, value in (("eager_s", eager_s), ("near_gb", near_gb)):
            if not value >= 0:
                raise GateConfigError(f"{name}={value!r} must be >= 0")
        if isinstance(source, str):
            source = build_source(source, prometheus_url, exporter_url=exporter_url, exporter_options=exporter_options)
        self.source = source
        self.max_age_s = max_age_s
        self.fail_open = fail_open
        self.clear_samples = clear_samples
        self.poll_s = poll_s
        self.fast_poll_s = min(poll_s, max(fast_poll_s, getattr(self.source, "poll_floor_s", 0.0)))
        self.eager_s = eager_s
        self.near_bytes = self.threshold_bytes + int(near_gb * GIB)
        self.record_dir = Path(record_dir) if record_dir else None

    @classmethod
    def from_env(cls, **overrides) -> ResidualGate:
        """Settings from the environment; explicit arguments win.

        Threshold: $GPU_RESIDENCY_GATE_THRESHOLD_GB, else $MILES_MAX_RESIDUAL_GPU_MEM_GB, else 2.
        Source: $GPU_RESIDENCY_GATE_SOURCE, else auto: the exporter at $GPU_RESIDENCY_EXPORTER_URL,
        else Prometheus at $GPU_RESIDENCY_PROMETHEUS_URL, else NVML, else nvidia-smi.
        """
        if "threshold_gb" not in overrides:
            for name in (THRESHOLD_ENV, LEGACY_THRESHOLD_ENV):
                if os.environ.get(name, "") != "":
                    overrides["threshold_gb"] = parse_threshold(os.environ[name], name)
                    break
        overrides.setdefault("source", os.environ.get(SOURCE_ENV) or "auto")
        overrides.setdefault("prometheus_url", os.environ.get(PROMETHEUS_ENV) or None)
        overrides.setdefault("exporter_url", os.environ.get(EXPORTER_ENV) or None)
        overrides.setdefault("max_age_s", env_number(MAX_AGE_ENV, DEFAULT_MAX_AGE_S))
        overrides.setdefault("fail_open", os.environ.get(FAIL_OPEN_ENV, "").lower() in ("1", "true", "yes"))
        overrides.setdefault("clear_samples", int(env_number(CLEAR_SAMPLES_ENV, 1, minimum=0)))
        overrides.setdefault("record_dir", os.environ.get(REGISTRY_ENV) or None)
        return cls(**overrides)

    def check(
        self,
        gpus: Sequence[int | str],
        node: str | None = None,
        wake: str | None = None,
        waiting_for: str | None = None,
    ) -> Decision:
        """One look: clear only if every requested GPU has a fresh sample under the threshold.

        `wake`: the engine this decision guards; with a record directory the decision is
        written for the exporter (an engine woken while its gate said no is alerted on).
        `waiting_for`: the engine whose release is awaited, named in the explanation.
        """
        decision = self._look(gpus, node, waiting_for)
        if wake and self.record_dir is not None:
            self._record(wake, decision)
        return decision

    def _record(self, engine: str, decision: Decision) -> None:
        body = {"engine": engine, "clear": decision.ok, "time": time.time(), "gpus": list(decision.used_bytes)}
        # Recording is for observability; it never changes the decision. 0644 in a 0755 directory
        # whatever the umask: the exporter reads it as another user.
        with contextlib.suppress(OSError):
            write_atomic(ensure_dir(self.record_dir / "gate") / f"{engine}.json", json.dumps(body))

    def _look(self, gpus: Sequence[int | str], node: str | None, waiting_for: str | None) -> Decision:
        names = self._names(gpus)
        return self._decide(names, lambda: self.source.read(node or default_node()), waiting_for)

    @staticmethod
    def _names(gpus: Sequence[int | str]) -> list[str]:
        try:
            names = [normalise(gpu) for gpu in gpus]
        except ValueError as exc:
            raise GateConfigError(str(exc)) from None
        if not names:
            raise GateConfigError("no GPUs given")
        return names

    def _decide(self, names: list[str], read: Callable[[], list[GpuSample]], waiting_for: str | None) -> Decision:
        try:
            samples = read()
        except SourceError as exc:
            return Decision(
                ok=self.fail_open,
                gpus=tuple(GpuVerdict(n, None, self.fail_open, "source failed") for n in names),
                threshold_bytes=self.threshold_bytes,
                source=self.source.name,
                reasons=(str(exc),),
                fail_open=self.fail_open,
                waiting_for=waiting_for,
            )
        verdicts = tuple(self._verdict(name, samples) for name in names)
        return Decision(
            ok=all(v.clear for v in verdicts),
            gpus=verdicts,
            threshold_bytes=self.threshold_bytes,
            source=self.source.name,
            waiting_for=waiting_for,
        )

    def _verdict(self, name: str, samples: list[GpuSample]) -> GpuVerdict:
        found = [s for s in samples if s.matches(name)]
        if len(found) != 1:
            reason = "no sample for this GPU" if not found else f"ambiguous: matches {len(found)} GPUs"
            return GpuVerdict(name, None, False, reason)
        sample = found[0]
        if sample.age_seconds is not None and sample.age_seconds > self.max_age_s:
            return GpuVerdict(
                name,
                sample,
                False,
                f"stale: last sample {sample.age_seconds:.1f}s old > {self.max_age_s:g}s",
                stale=True,
            )
        if sample.used_bytes is None:
            return GpuVerdict(name, sample, False, "used memory not available ([N/A])")
        if sample.used_bytes >= self.threshold_bytes:
            return GpuVerdict(name, sample, False, "over threshold")
        return GpuVerdict(name, sample, True, "under threshold")

    def wait(
        self,
        gpus: Sequence[int | str],
        node: str | None = None,
        timeout: float = 120.0,
        on_poll: Callable[[Decision, float], None] | None = None,
        wake: str | None = None,
        waiting_for: str | None = None,
    ) -> Decision:
        """Look until `clear_samples` consecutive looks are clear; raise GateTimeout otherwise.

        The pace adapts (see __init__): every `fast_poll_s` while close to clearing, backing off
        to `poll_s` while far; after a clear look the next comes `poll_s` later, so
        `clear_samples` holds the GPUs clear for as long as it always did. With a source that
        reads used memory alone (NVML) the repeated looks skip the holders; a timeout looks once
        more in full, so its explanation names them. With a long-polling source (the exporter)
        each look waits at the source. `wake` and `waiting_for` as in check(); with `wake` the
        decision is recorded on the first look, whenever it changes, and at the end, not on
        every look.
        """
        if not timeout > 0:
            raise GateConfigError(f"timeout={timeout!r} must be > 0")
        names = self._names(gpus)
        node = node or default_node()
        long_poll = getattr(self.source, "wait_until_under", None)
        read_used = getattr(self.source, "read_used", None)
        pace = Pace(self.fast_poll_s, self.poll_s, self.eager_s, self.near_bytes)
        started = time.monotonic()
        streak = 0
        recorded: bool | None = None
        while True:
            budget = 0.0
            if long_poll is not None:
                # One long poll per look, a few seconds at most so a hung exporter is noticed; while
                # confirming a clear streak, a look that answers at once.
                budget = 0.0 if streak else max(0.0, min(timeout - (time.monotonic() - started), LONG_POLL_S))
                read = lambda b=budget: long_poll(node, names, self.threshold_bytes, b)  # noqa: E731
            elif read_used is not None:
                read = lambda: read_used(node)  # noqa: E731
            else:
                read = lambda: self.source.read(node)  # noqa: E731
            looked = time.monotonic()
            decision = self._decide(names, read, waiting_for)
            now = time.monotonic()
            elapsed = now - started
            streak = streak + 1 if decision.ok else 0
            done = streak >= self.clear_samples
            if not done and elapsed >= timeout and read_used is not None and long_poll is None:
                decision = self._look(names, node, waiting_for)  # in full: the explanation names the holders
                streak = streak + 1 if decision.ok else 0
                done = streak >= self.clear_samples
            if wake and self.record_dir is not None and (decision.ok != recorded or done or elapsed >= timeout):
                self._record(wake, decision)
                recorded = decision.ok
            if on_poll is not None:
                on_poll(decision, elapsed)
            if done:
                return decision
            if elapsed >= timeout:
                raise GateTimeout(decision, elapsed)
            if long_poll is not None and not decision.ok and not decision.reasons and now - looked >= 0.9 * budget > 0:
                continue  # the long poll waited its time out: ask again at once
            # A clear streak is confirmed at poll_s, as before: clear_samples buys the same hold time.
            delay = self.poll_s if decision.ok else pace.next(decision, elapsed)
            time.sleep(min(delay, timeout - elapsed))
