"""Drop-in shapes for today's call sites in RLix and miles (synchronous: they run in Ray actor methods).

    parse_env_positive_float(name, default)        -> float           (RuntimeError on a bad value)
    probe_max_used_gpu_mem_gb(gpu_ids)             -> float | None    (None: cannot measure)
    wait_for_residual_or_proceed(gpu_ids, 60.0)    -> None            (RLix's soft wait: warns and goes on)
    wait_for_residual(gpu_ids, threshold_gb, 60.0) -> float           (the gate: raises GateTimeout)

The first three keep the contract of the RLix code they replace (docs/GATE.md lists the
few deliberate differences); `wait_for_residual_or_proceed(..., fail_closed=True)` and
`wait_for_residual` are the gate's own behaviour: a source that cannot measure is never a
reason to go ahead. The GPU helpers read the source chosen by the environment (see
ResidualGate.from_env) and log on the `gate.compat` logger.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence

from gate.core import ResidualGate
from gate.decision import Decision, GateTimeout
from gate.readings import GIB, SourceError
from gate.settings import (
    DEFAULT_THRESHOLD_GB,
    EXPORTER_ENV,
    PROMETHEUS_ENV,
    SELECTOR_ENV,
    SOURCE_ENV,
    GateConfigError,
    parse_threshold,
)
from gate.sources import build_source

log = logging.getLogger(__name__)

RLIX_THRESHOLD_ENV = "MILES_MAX_RESIDUAL_GPU_MEM_GB"
# The threshold's default per RLix contract: PR #11's polling wait; the newer miles pipeline's one
# look (its tests assert 7.0; a smoke configuration ran 13.0; 2.0 and 10.0 came before).
RLIX_DEFAULTS_GB = {"poll": 10.0, "probe-once": 7.0}
RLIX_GRACE_S = 3.0  # how long RLix sleeps before going ahead when it cannot measure
PROBE_TIMEOUT_S = 5.0  # RLix's nvidia-smi timeout


class EnvValueError(GateConfigError, RuntimeError):
    """A bad number in the environment: a RuntimeError, as RLix's parser raises, and a GateConfigError."""


def parse_env_positive_float(name: str, default: float) -> float:
    """The number > 0 in $`name`, or float(`default`) when it is unset, with RLix's messages.

    "" or "abc" -> EnvValueError("NAME must be a number, got: 'abc'"); "0" or "-1" ->
    EnvValueError("NAME must be > 0, got: 0.0"). Unlike RLix's parser, "nan" and "inf" are
    refused too ("NAME must be a finite number, got: 'nan'"): neither is a threshold.
    """
    raw = os.environ.get(name)
    if raw is None:
        return float(default)
    try:
        value = float(raw)
    except ValueError as exc:
        raise EnvValueError(f"{name} must be a number, got: {raw!r}") from exc
    if not math.isfinite(value):
        raise EnvValueError(f"{name} must be a finite number, got: {raw!r}")
    if value <= 0.0:
        raise EnvValueError(f"{name} must be > 0, got: {value!r}")
    return value


def look(gpu_ids: Sequence[int | str], node: str | None, timeout_s: float) -> tuple[Decision | None, str]:
    """(one look at `gpu_ids` through the environment's source, "") or (None, why it cannot look).
    Reads the environment's source, never its threshold variables: a probe has no threshold."""
    ids = list(gpu_ids)
    if not ids:
        return None, "no GPUs given"
    try:
        source = build_source(
            os.environ.get(SOURCE_ENV) or "auto",
            os.environ.get(PROMETHEUS_ENV) or None,
            timeout_s,
            exporter_url=os.environ.get(EXPORTER_ENV) or None,
            prometheus_selector=os.environ.get(SELECTOR_ENV) or None,
        )
    except GateConfigError as exc:
        # A source that could not start (no NVML, no nvidia-smi) is a fact of this host: the
        # SourceError it raised is the context. Anything else is a setting that cannot work.
        if not isinstance(exc.__context__, SourceError):
            log.warning("GPU memory probe: %s", exc)
        return None, str(exc)
    try:
        gate = ResidualGate.from_env(threshold_gb=DEFAULT_THRESHOLD_GB, source=source, fail_open=False)
        # GateConfigError from check: an id naming no GPU ("", -1, a MIG name a source cannot read, an unknown index)
        decision = gate.check(ids, node, holders=False)
    except GateConfigError as exc:
        log.warning("GPU memory probe: %s", exc)
        return None, str(exc)
    if decision.reasons:
        return None, "; ".join(decision.reasons)
    return decision, ""


def _measure(gpu_ids: Sequence[int | str], node: str | None, timeout_s: float) -> tuple[float | None, str]:
    """(max GiB over the GPUs, "") or (None, why it cannot measure)."""
    decision, why = look(gpu_ids, node, timeout_s)
    if decision is None:
        return None, why
    used = []
    for verdict in decision.gpus:
        sample = verdict.sample
        if sample is None or verdict.stale:
            return None, f"GPU {verdict.requested}: {verdict.reason}"
        if sample.used_bytes is None:
            log.warning(
                "GPU memory probe: GPU %s (%s) answers [N/A] for its used memory; left out of the max",
                verdict.requested,
                sample.uuid or sample.pci_bus_id or "no uuid",
            )
            continue
        used.append(sample.used_bytes)
    if not used:
        return None, "every GPU answers [N/A]"
    return max(used) / GIB, ""


def probe_max_used_gpu_mem_gb(
    gpu_ids: Sequence[int | str], node: str | None = None, *, timeout_s: float = PROBE_TIMEOUT_S
) -> float | None:
    """Max whole-GPU used memory over `gpu_ids` in GiB, or None when it cannot be measured.

    None for `[]`, for an id no GPU answers to, and for every runtime failure of the source
    (no nvidia-smi, one that cannot run, exits non-zero, outlives `timeout_s` or prints what
    does not parse; NVML or Prometheus down): logged at DEBUG, never raised. A GPU that
    answers "[N/A]" is left out of the max with a WARNING naming it (None if all do).
    """
    used, why = _measure(gpu_ids, node, timeout_s)
    if used is None:
        log.debug("GPU memory probe: cannot measure: %s", why)
    return used


def _blind(decision: Decision) -> str | None:
    """Why the decision could not measure every GPU, or None when it did."""
    if decision.reasons:
        return "; ".join(decision.reasons)
    missing = [f"GPU {v.requested}: {v.reason}" for v in decision.gpus if v.measured_bytes is None]
    return "; ".join(missing) or None


def wait_for_residual(
    gpu_ids: Sequence[int | str],
    threshold_gb: float,
    timeout_s: float = 60.0,
    poll_s: float = 0.5,
    node: str | None = None,
) -> float:
    """Block until every GPU in `gpu_ids` is under `threshold_gb`; return the last max (GiB).

    The gate's adaptive wait: it looks every few milliseconds while the GPUs are close to
    clearing (and in the first seconds, right after a release), backing off to `poll_s` while
    far, so it returns milliseconds after the memory drops (docs/GATE.md has the figures).
    Fail-closed: a GPU that cannot be measured blocks. Raises GateTimeout (a TimeoutError)
    with the per-GPU explanation when time runs out. Returns NaN only when fail-open was
    configured ($GPU_RESIDENCY_GATE_FAIL_OPEN) and the source could not measure.
    """
    ids = list(gpu_ids)
    gate = ResidualGate.from_env(threshold_gb=threshold_gb, poll_s=poll_s)
    warned: list[bool] = []

    def on_poll(decision: Decision, elapsed: float) -> None:
        reason = _blind(decision)
        if reason and not decision.fail_open and not warned:
            warned.append(True)
            log.warning("residual wait on GPUs %s cannot measure (%s); blocking until it can", ids, reason)

    try:
        decision = gate.wait(ids, node, timeout=timeout_s, on_poll=on_poll)
    except GateTimeout as exc:
        log.warning("residual wait on GPUs %s timed out: %s", ids, str(exc).replace("\n", "; "))
        raise
    used = decision.max_used_gb
    if used is None:
        log.warning("residual wait on GPUs %s: clear by fail-open, unmeasured (%s)", ids, _blind(decision))
        return float("nan")
    log.info("residual clear on GPUs %s: max %.2f GiB used < %.2f GiB", ids, used, threshold_gb)
    return used


def wait_for_residual_or_proceed(
    gpu_ids: Sequence[int | str],
    timeout_s: float = 60.0,
    *,
    fail_closed: bool = False,
    threshold_gb: float | None = None,
    poll_s: float = 0.5,
    grace_s: float = RLIX_GRACE_S,
    node: str | None = None,
    contract: str = "poll",
) -> None:
    """RLix's residual check after the engines offload, as one call, in the contract RLix had:

    `contract="poll"` (RLix PR #11): poll until max used <= the threshold (default 10 GiB);
    `contract="probe-once"` (RLix's newer miles pipeline): one look, `RuntimeError("Post-offload
    whole-GPU residual X GiB exceeds threshold Y GiB on overlap GPUs [...]")` when over (exactly
    at the threshold passes), default 7 GiB; cannot measure: WARNING ("fail-open"), return at
    once; `timeout_s` is not used (RLix's bounds only its engine-state wait).

    With `contract="poll"`:

    The threshold is `threshold_gb`, else $MILES_MAX_RESIDUAL_GPU_MEM_GB read by
    parse_env_positive_float (default 10 GiB; a bad value raises its RuntimeError). Clear:
    INFO with the figure, return. Cannot measure: WARNING, sleep `grace_s` (3 s), return.
    Timeout: WARNING with the last figure, return. Returns None; never raises on timeout.

    `fail_closed=True` switches to the gate's behaviour: the same threshold, but a GPU that
    cannot be measured blocks instead of being waited out, and a timeout raises GateTimeout
    with the per-GPU explanation (this is wait_for_residual: clear is strictly below).
    """
    if contract not in RLIX_DEFAULTS_GB:
        raise GateConfigError(f"contract={contract!r} must be one of {', '.join(RLIX_DEFAULTS_GB)}")
    ids = list(gpu_ids)
    if not ids:
        return None  # nothing allocated, nothing to wait for (RLix returns before reading its threshold)
    if threshold_gb is None:
        threshold = parse_env_positive_float(RLIX_THRESHOLD_ENV, RLIX_DEFAULTS_GB[contract])
    else:
        threshold = parse_threshold(threshold_gb, "threshold_gb")
    if contract == "probe-once" and not fail_closed:
        return _probe_once_or_raise(ids, threshold, node)
    if fail_closed:
        wait_for_residual(ids, threshold, timeout_s=timeout_s, poll_s=poll_s, node=node)
        return None
    started = time.monotonic()
    last: float | None = None
    while time.monotonic() - started < timeout_s:
        used, why = _measure(ids, node, PROBE_TIMEOUT_S)
        if used is None:
            log.warning(
                "residual wait on GPUs %s cannot measure GPU memory (%s); going ahead after a %gs grace sleep "
                "(fail_closed=True blocks instead)",
                ids,
                why,
                grace_s,
            )
            time.sleep(grace_s)
            return None
        last = used
        if used <= threshold:
            log.info("residual clear on GPUs %s: max %.2f GiB used <= %.1f GiB", ids, used, threshold)
            return None
        time.sleep(poll_s)
    log.warning(
        "residual wait on GPUs %s timed out after %.1fs: max %s GiB used > %.1f GiB; going ahead, the wake-up may OOM",
        ids,
        timeout_s,
        "n/a" if last is None else f"{last:.2f}",
        threshold,
    )
    return None


def _probe_once_or_raise(ids: list[int | str], threshold: float, node: str | None) -> None:
    """RLix's newer check: one probe; over the threshold raises, blind goes ahead (fail-open)."""
    used, why = _measure(ids, node, PROBE_TIMEOUT_S)
    if used is None:
        log.warning("post-offload residual on GPUs %s cannot be measured (%s); fail-open: going ahead", ids, why)
        return None
    if used > threshold:
        raise RuntimeError(
            f"Post-offload whole-GPU residual {used:.2f} GiB exceeds threshold {threshold:.2f} GiB on overlap GPUs "
            f"{ids}: the engines' memory is not released; waking the trainer now would OOM "
            f"(${RLIX_THRESHOLD_ENV} sets the threshold)"
        )
    log.info("post-offload residual on GPUs %s: max %.2f GiB used <= %.1f GiB", ids, used, threshold)
    return None
