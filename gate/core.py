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
from gate.identity import LocalView, UnresolvedGpu, local_view, resolve
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
    LONG_POLL_S,
    MAX_AGE_ENV,
    PROMETHEUS_ENV,
    REGISTRY_ENV,
    SELECTOR_ENV,
    SOURCE_ENV,
    STREAK_SLACK_S,
    GateConfigError,
    default_node,
    env_number,
    parse_threshold,
    threshold_from_env,
)
from gate.sources import Source, admit_mig, build_source
from gate.verdicts import verdict
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
        prometheus_selector: str | None = None,
    ) -> None:
        """`poll_s`: the longest a wait sleeps between looks (far from clearing); `fast_poll_s`: the
        shortest, used for `eager_s` seconds after the wait starts, while the max used is within
        `near_gb` of the threshold, and while it falls. A source's own floor (`poll_floor_s`:
        0.5 s for nvidia-smi, 0.1 s for Prometheus) raises `fast_poll_s`. `prometheus_selector`: see from_env."""
        self.threshold_bytes = int(parse_threshold(threshold_gb, "threshold_gb") * GIB)
        if isinstance(clear_samples, bool) or not isinstance(clear_samples, int) or clear_samples < 1:
            raise GateConfigError(f"clear_samples={clear_samples!r} must be an integer >= 1")
        for name, value in (("max_age_s", max_age_s), ("poll_s", poll_s), ("fast_poll_s", fast_poll_s)):
            if not value > 0:
                raise GateConfigError(f"{name}={value!r} must be > 0")
        for name, value in (("eager_s", eager_s), ("near_gb", near_gb)):
            if not value >= 0:
                raise GateConfigError(f"{name}={value!r} must be >= 0")
        if isinstance(source, str):
            options = {"exporter_options": exporter_options, "prometheus_selector": prometheus_selector}
            source = build_source(source, prometheus_url, exporter_url=exporter_url, **options)
        self.source = source
        self.max_age_s = max_age_s
        self.fail_open = fail_open
        self.clear_samples = clear_samples
        self.poll_s = poll_s
        self.fast_poll_s = min(poll_s, max(fast_poll_s, getattr(self.source, "poll_floor_s", 0.0)))
        self.eager_s = eager_s
        self.near_bytes = self.threshold_bytes + int(near_gb * GIB)
        self.record_dir = Path(record_dir) if record_dir else None
        self._view: list[LocalView | None] | None = None  # this process's view of its GPUs, read once
        self._resolved: dict[tuple[str, ...], list[str]] = {}

    @classmethod
    def from_env(cls, **overrides) -> ResidualGate:
        """Settings from the environment; explicit arguments win.

        Threshold: $GPU_RESIDENCY_GATE_THRESHOLD_GB, else $MILES_MAX_RESIDUAL_GPU_MEM_GB, else 2.
        Source: $GPU_RESIDENCY_GATE_SOURCE, else auto: the exporter at $GPU_RESIDENCY_EXPORTER_URL,
        else Prometheus at $GPU_RESIDENCY_PROMETHEUS_URL, read through the label matchers (cluster="a")
        in $GPU_RESIDENCY_PROMETHEUS_SELECTOR when it holds several clusters, else NVML, else nvidia-smi.
        """
        if "threshold_gb" not in overrides and (from_env := threshold_from_env()) is not None:
            overrides["threshold_gb"] = from_env
        overrides.setdefault("source", os.environ.get(SOURCE_ENV) or "auto")
        overrides.setdefault("prometheus_url", os.environ.get(PROMETHEUS_ENV) or None)
        overrides.setdefault("prometheus_selector", os.environ.get(SELECTOR_ENV) or None)
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
        holders: bool = True,
    ) -> Decision:
        """One look: clear only if every requested GPU has a fresh sample under the threshold.

        `wake`: the engine this decision guards; with a record directory the decision is
        written for the exporter (an engine woken while its gate said no is alerted on).
        `waiting_for`: the engine whose release is awaited, named in the explanation.
        `holders=False`: used memory only, where the source can read it alone (a probe).
        """
        decision = self._look(self._names(gpus), node or default_node(), waiting_for, holders)
        if wake and self.record_dir is not None:
            self._record(wake, decision)
        return decision

    def _record(self, engine: str, decision: Decision) -> None:
        body = {"engine": engine, "clear": decision.ok, "time": time.time(), "gpus": list(decision.used_bytes)}
        # Recording is for observability; it never changes the decision. 0644 in a 0755 directory
        # whatever the umask: the exporter reads it as another user.
        with contextlib.suppress(OSError):
            write_atomic(ensure_dir(self.record_dir / "gate") / f"{engine}.json", json.dumps(body))

    def _look(self, names: list[str], node: str, waiting_for: str | None, holders: bool = True) -> Decision:
        read_used = getattr(self.source, "read_used", None)
        if not holders and read_used is not None:
            return self._decide(names, node, lambda targets: read_used(node), waiting_for)
        read_named = getattr(self.source, "read_named", None)
        if read_named is not None:
            return self._decide(names, node, lambda targets: read_named(node, targets), waiting_for)
        return self._decide(names, node, lambda targets: self.source.read(node), waiting_for)

    def _targets(self, names: list[str], node: str) -> list[str]:
        """What each name is matched against in the source's samples: itself for a local source;
        for a remote one, an index becomes the UUID of that card in this process's view (a pod
        given host GPUs 4-7 calls them 0-3; the exporter calls them 4-7). Kept per gate: a
        process's cards do not change. SourceError when the view needs the source and it fails."""
        if not getattr(self.source, "remote", False):
            return names
        key = tuple(names)
        if key not in self._resolved:
            if self._view is None:
                self._view = [local_view()]
            view = self._view[0]
            try:
                try:
                    targets = resolve(names, view, None)
                except LookupError:  # the view numbers its cards by bus id: the source has them
                    read_named = getattr(self.source, "read_named", None)
                    wanted = list(view.visible_uuids) if view else []
                    samples = read_named("", wanted) if read_named and wanted else self.source.read(node)
                    targets = resolve(names, view, samples)
            except UnresolvedGpu as exc:
                raise GateConfigError(str(exc)) from None
            self._resolved[key] = targets
        return self._resolved[key]

    def _names(self, gpus: Sequence[int | str]) -> list[str]:
        """The GPUs' names; a MIG device's only where the source reads MIG devices (`reads_mig`)."""
        try:
            names = admit_mig(self.source, [normalise(gpu) for gpu in gpus])
        except ValueError as exc:
            raise GateConfigError(str(exc)) from None
        if not names:
            raise GateConfigError("no GPUs given")
        return names

    def _decide(
        self, names: list[str], node: str, read: Callable[[list[str]], list[GpuSample]], waiting_for: str | None
    ) -> Decision:
        try:
            targets = self._targets(names, node)
            samples = read(targets)
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
        verdicts = tuple(
            verdict(name, target, samples, self.threshold_bytes, self.max_age_s)
            for name, target in zip(names, targets, strict=True)
        )
        return Decision(
            ok=all(v.clear for v in verdicts),
            gpus=verdicts,
            threshold_bytes=self.threshold_bytes,
            source=self.source.name,
            waiting_for=waiting_for,
        )

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
        streak, counted_at = 0, 0.0
        recorded: bool | None = None
        while True:
            budget = 0.0
            if long_poll is not None:
                # One long poll per look, a few seconds at most so a hung exporter is noticed; while
                # confirming a clear streak, a look that answers at once.
                budget = 0.0 if streak else max(0.0, min(timeout - (time.monotonic() - started), LONG_POLL_S))
                read = lambda targets, b=budget: long_poll(node, targets, self.threshold_bytes, b)  # noqa: E731
            elif read_used is not None:
                read = lambda targets: read_used(node)  # noqa: E731
            else:
                read = lambda targets: self.source.read(node)  # noqa: E731
            looked = time.monotonic()
            decision = self._decide(names, node, read, waiting_for)
            now = time.monotonic()
            elapsed = now - started
            streak, counted_at = self._streak(streak, counted_at, decision.ok, looked)
            done = streak >= self.clear_samples
            if not done and elapsed >= timeout and read_used is not None and long_poll is None:
                looked = time.monotonic()
                decision = self._look(names, node, waiting_for)  # in full: the explanation names the holders
                streak, counted_at = self._streak(streak, counted_at, decision.ok, looked)
                done = streak >= self.clear_samples
            if wake and self.record_dir is not None and (decision.ok != recorded or done or elapsed >= timeout):
                self._record(wake, decision)
                recorded = decision.ok
            if on_poll is not None:
                on_poll(decision, elapsed)
            if done:
                return decision
            if elapsed >= timeout:
                raise GateTimeout(decision, elapsed, self._held(streak))
            if long_poll is not None and not decision.ok and not decision.reasons and now - looked >= 0.9 * budget > 0:
                continue  # the long poll waited its time out: ask again at once
            # A clear streak is confirmed at poll_s: clear_samples buys a hold of (clear_samples - 1) * poll_s.
            delay = self.poll_s if decision.ok else pace.next(decision, elapsed)
            if decision.ok and elapsed + delay > timeout:
                raise GateTimeout(decision, elapsed, self._held(streak))  # the streak cannot end in time
            time.sleep(min(delay, timeout - elapsed))

    def _streak(self, streak: int, counted_at: float, clear: bool, looked: float) -> tuple[int, float]:
        """(clear looks in a row, when the last one counted): a clear look counts only poll_s or
        more after the last counted one; a look sooner (the full look at the timeout) counts for
        nothing, and a look that is not clear starts over."""
        if not clear:
            return 0, 0.0
        if streak == 0 or looked - counted_at >= self.poll_s - STREAK_SLACK_S:
            return streak + 1, looked
        return streak, counted_at

    def _held(self, streak: int) -> str:
        if self.clear_samples == 1 or streak == 0:
            return ""
        return f"clear on {streak} of the {self.clear_samples} looks {self.poll_s:g}s apart it needs"
