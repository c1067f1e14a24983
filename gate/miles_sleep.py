"""Drop-ins for rlops/miles' post-sleep checks (SGLangEngine, miles/backends/sglang_utils/sglang_engine.py):

    log_post_sleep_residual_diagnostics(root_pid, base_url, threshold_gb)  -> float | None  (GiB the tree holds)
    assert_post_sleep_vram_below_threshold(base_url, threshold_gb)         -> float  (RuntimeError when over)
    log_whole_gpu(label, engine=...)                                        -> {gpu: MiB or None}
    with whole_gpu_audit("release_memory_occupation", engine=...): ...      (before and after)

miles sums /server_info's weight+kvcache+graph with float(), a TypeError once `graph` is SGLang's
per-phase dict; here every /server_info shape is read by the exporter's own parser
(exporter.pollers.sglang_parse). The residual held after a sleep is measured, per GPU, from
NVML's process lists over the engine's process tree (exporter.gpu_probe); whole-GPU figures
come from the environment's source (gate.compat.look). None of these raise for a source that
cannot measure: they log what they could not see. Messages begin as miles' do.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gate.compat import look
from gate.readings import GIB

log = logging.getLogger(__name__)

MIB = 1024**2
AUDIT_PREFIX = "[SGL-OFFLOAD-AUDIT]"


def _server_info(base_url: str, timeout_s: float, api_key: str | None) -> list[float]:
    """weight+kvcache+graph per DP rank, GiB. Raises what miles' GET raises (requests'
    exceptions: HTTPError for a status, ValueError for a body that is no JSON) and its
    RuntimeError for a body without per-rank accounting."""
    import requests

    from exporter.pollers.sglang_parse import ShapeError, parse_server_info

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = requests.get(f"{base_url.rstrip('/')}/server_info", timeout=timeout_s, headers=headers)
    response.raise_for_status()
    try:
        ranks = parse_server_info(response.content)
    except ShapeError as exc:
        raise RuntimeError(
            f"/server_info response missing 'internal_states' list ({exc}); cannot enforce post-sleep VRAM threshold"
        ) from None
    totals = []
    for rank in ranks:
        if not rank.components:
            raise RuntimeError(
                f"/server_info internal_states entry missing 'memory_usage' dict (DP rank {rank.dp_rank}: "
                "no weight, kvcache or graph figure); unknown is not 0"
            )
        totals.append(sum(rank.components.values()) / GIB)
    if not totals:
        raise RuntimeError(
            "/server_info response missing 'internal_states' list; cannot enforce post-sleep VRAM threshold"
        )
    return totals


def _engine(base_url: str) -> str:
    return urlsplit(base_url).netloc or base_url


def assert_post_sleep_vram_below_threshold(
    base_url: str, threshold_gb: float, timeout_s: float = 5.0, *, api_key: str | None = None
) -> float:
    """Max over DP ranks of /server_info's weight+kvcache+graph (GiB); RuntimeError above `threshold_gb`.

    miles' check with every shape summed (a per-phase `graph` dict, `cuda_graph`, a flat
    `internal_states`). This is SGLang's start-up accounting, which a sleep does not lower:
    log_post_sleep_residual_diagnostics measures what the engine still holds.
    """
    observed = max(_server_info(base_url, timeout_s, api_key))
    if observed > float(threshold_gb):
        raise RuntimeError(
            f"Post-sleep VRAM {observed:.3f} GiB (max across DPs, weight+kvcache+graph) exceeds threshold "
            f"{float(threshold_gb):.3f} GiB on engine {_engine(base_url)} — torch_memory_saver may have leaked. "
            "Check release_memory_occupation tags. (/server_info is start-up accounting: a released engine "
            "still reports its pools.)"
        )
    return observed


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def log_post_sleep_residual_diagnostics(
    root_pid: int | None,
    base_url: str | None = None,
    threshold_gb: float | None = None,
    timeout_s: float = 5.0,
    *,
    api_key: str | None = None,
) -> float | None:
    """After a release: the GiB the engine's process tree still holds (max over GPUs), or None
    when it cannot be measured. Logs, on one INFO line, that residual per GPU beside the
    whole-GPU used memory of the same GPUs and /server_info's accounting; never raises."""
    from exporter.gpu_probe import query_process_tree_gpu_used_bytes

    engine = _engine(base_url) if base_url else str(root_pid)
    per_gpu = query_process_tree_gpu_used_bytes(root_pid, timeout_s) or {}
    whole = _whole_gpu_mib(list(per_gpu), timeout_s)[0] if per_gpu else {}
    account = None
    if base_url:
        try:
            account = max(_server_info(base_url, timeout_s, api_key))
        except Exception as exc:  # a diagnostic: what it could not read is logged, never raised
            log.debug("post-sleep diagnostic: /server_info of %s unreadable: %s", engine, exc)
    resident = max(per_gpu.values()) / GIB if per_gpu else None
    gpus = {uuid: f"{used / GIB:.3f} GiB (whole GPU {_gib(_div(whole.get(uuid), 1024))} GiB)"
            for uuid, used in per_gpu.items()}  # fmt: skip
    log.info(
        "post-sleep residual diagnostic engine=%s process_resident=%s GiB per_gpu=%s "
        "server_info_accounting(weight+kvcache+graph)=%s GiB whole_gpu_threshold=%s GiB",
        engine,
        _gib(resident),
        gpus,
        _gib(account),
        _gib(None if threshold_gb is None else float(threshold_gb)),
    )
    if resident is None:
        log.warning(
            "post-sleep process-resident diagnostic unavailable on engine %s (NVML unreadable, or no process of "
            "the tree %s on any GPU: another PID namespace than NVML's, or the tree has exited).",
            engine,
            root_pid,
        )
    return resident


def _div(value: float | None, by: float) -> float | None:
    return None if value is None else value / by


def _whole_gpu_mib(gpus: Sequence[int | str], timeout_s: float) -> tuple[dict[str, float | None], str]:
    """({gpu: MiB used, None when unmeasured}, "") or ({}, why nothing could be read)."""
    decision, why = look(gpus, None, timeout_s)
    if decision is None:
        return {}, why
    return {v.requested: _div(v.measured_bytes, MIB) for v in decision.gpus}, ""


def log_whole_gpu(
    label: str, engine: str = "", gpus: Sequence[int | str] | None = None, timeout_s: float = 10.0
) -> dict[str, float | None]:
    """miles' `_log_whole_gpu`: prints `[SGL-OFFLOAD-AUDIT] <label> engine=… gpus={…}` (stdout, as
    miles prints: a Ray actor often has no log handler) and returns the MiB used per GPU.

    The GPUs are `gpus`, else this process's ($CUDA_VISIBLE_DEVICES, indices or UUIDs, else
    every GPU it sees). A GPU that cannot be read is None, and the whole line says "probe
    failed" when nothing can be; never raises."""
    from gate.integrations import this_process_gpus

    try:
        ids = list(gpus) if gpus is not None else this_process_gpus()
        usage, why = _whole_gpu_mib(ids, timeout_s)
    except RuntimeError as exc:
        usage, why = {}, str(exc)
    if not usage:
        print(f"{AUDIT_PREFIX} {label}: probe failed {why}", flush=True)
        return {}
    shown = {gpu: "n/a" if mib is None else f"{mib:.0f} MiB" for gpu, mib in usage.items()}
    print(f"{AUDIT_PREFIX} {label} engine={engine} gpus={shown}", flush=True)
    return usage


@dataclass
class Audit:
    """Whole-GPU MiB used per GPU before and after an operation ({} when it could not be read)."""

    before: dict[str, float | None] = field(default_factory=dict)
    after: dict[str, float | None] = field(default_factory=dict)

    def returned_mib(self) -> dict[str, float]:
        """MiB the operation gave back per GPU (negative: it took), for GPUs measured both times."""
        returned = {}
        for gpu, after in self.after.items():
            before = self.before.get(gpu)
            if before is not None and after is not None:
                returned[gpu] = before - after
        return returned


@contextlib.contextmanager
def whole_gpu_audit(
    operation: str, engine: str = "", gpus: Sequence[int | str] | None = None, timeout_s: float = 10.0
) -> Iterator[Audit]:
    """`log_whole_gpu("before <operation>")`, the block, `log_whole_gpu("after <operation>")`, as
    miles wraps release_memory_occupation and resume_memory_occupation; the after-line is printed
    even when the block raises."""
    audit = Audit(before=log_whole_gpu(f"before {operation}", engine, gpus, timeout_s))
    try:
        yield audit
    finally:
        audit.after = log_whole_gpu(f"after {operation}", engine, gpus, timeout_s)
