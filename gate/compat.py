"""Drop-in shapes for today's call sites in RLix/miles (synchronous: they run in Ray actor methods).

    probe_max_used_gpu_mem_gb(gpu_ids)                  -> float | None   (None: cannot measure)
    wait_for_residual(gpu_ids, threshold_gb, timeout_s)  -> float          (raises GateTimeout)

Unlike the nvidia-smi loop they replace, a missing tool is not a reason to go ahead:
both read the source chosen by the environment (see ResidualGate.from_env) and block
when it cannot measure.
"""

from __future__ import annotations

from collections.abc import Sequence

from gate.core import GateConfigError, ResidualGate


def probe_max_used_gpu_mem_gb(gpu_ids: Sequence[int | str], node: str | None = None) -> float | None:
    """Max whole-GPU used memory over `gpu_ids` in GiB, or None if any of them cannot be measured."""
    try:
        gate = ResidualGate.from_env(fail_open=False)
    except GateConfigError:
        return None
    return gate.check(gpu_ids, node).max_used_gb


def wait_for_residual(
    gpu_ids: Sequence[int | str],
    threshold_gb: float,
    timeout_s: float = 60.0,
    poll_s: float = 0.5,
    node: str | None = None,
) -> float:
    """Block until every GPU in `gpu_ids` is under `threshold_gb`; return the last max (GiB).

    Raises GateTimeout (a TimeoutError) with the per-GPU explanation when time runs out.
    Returns NaN only when fail-open was configured and the source could not measure.
    """
    gate = ResidualGate.from_env(threshold_gb=threshold_gb, poll_s=poll_s)
    used = gate.wait(gpu_ids, node, timeout=timeout_s).max_used_gb
    return float("nan") if used is None else used
