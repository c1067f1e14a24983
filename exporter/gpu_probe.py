"""The GPU memory one engine's process tree holds, measured from inside a framework process.

    from exporter.gpu_probe import query_process_tree_gpu_used_gb

    resident_gb = query_process_tree_gpu_used_gb(engine_process.pid)  # GiB, or None: cannot measure

The same question rlops/miles' `gpu_probe.query_process_tree_gpu_used_gb` answers with
nvidia-smi, answered with the exporter's own pieces: NVML's process list of every GPU
(exporter.sources.nvml, with its deadline against a hung driver) and a walk up from each GPU
process to the root through /proc (exporter.proctable.ProcView.ancestry, as the exporter
attributes processes to engines). Standard library only, plus nvidia-ml-py imported when
first needed: importing this never loads prometheus_client.
"""

from __future__ import annotations

import logging
import threading

from exporter.errors import ErrorCounter
from exporter.sources.nvml import DEFAULT_TIMEOUT_SECONDS, NvmlSource
from exporter.sources.proctable import ProcView

log = logging.getLogger(__name__)

GIB = 1024**3


class _FrameworkNvml(NvmlSource):
    """The exporter's NVML source, minus its exporter-worded warning: here a missing NVML means "cannot measure"."""

    def _init_failed(self, reason: str, message: str) -> bool:
        log.debug("NVML unavailable (%s); process-tree GPU memory cannot be measured", message)
        return False


_sources: dict[float, NvmlSource] = {}  # one per timeout: each owns the worker thread of its deadline
_lock = threading.Lock()


def _nvml(timeout_s: float) -> NvmlSource:
    with _lock:
        source = _sources.get(timeout_s)
        if source is None:
            source = _sources[timeout_s] = _FrameworkNvml(ErrorCounter(), timeout=timeout_s)
        return source


def query_process_tree_gpu_used_bytes(
    root_pid: int | None, timeout_s: float = DEFAULT_TIMEOUT_SECONDS
) -> dict[str, int] | None:
    """Per GPU (by UUID), the bytes `root_pid` and its descendants hold there; the GPUs where the
    tree holds nothing are absent. None when it cannot measure (see query_process_tree_gpu_used_gb)."""
    if root_pid is None:
        return None
    reading = _nvml(timeout_s).read()
    if not reading.complete:
        log.debug("process-tree GPU memory of %s: NVML could not read every GPU and its processes", root_pid)
        return None
    view = ProcView()
    per_gpu: dict[str, int] = {}
    for gpu in reading.gpus:
        for process in gpu.processes or ():
            if process.used_bytes is None:
                continue
            if any(ancestor.pid == root_pid for ancestor in view.ancestry(process.pid)):
                per_gpu[gpu.uuid] = per_gpu.get(gpu.uuid, 0) + process.used_bytes
    if not per_gpu:
        log.debug("process-tree GPU memory of %s: no process of the tree on any GPU", root_pid)
        return None
    return per_gpu


def query_process_tree_gpu_used_gb(root_pid: int | None, timeout_s: float = DEFAULT_TIMEOUT_SECONDS) -> float | None:
    """Max over GPUs of the memory `root_pid` and its descendants hold on that GPU, in GiB.

    Per GPU, the processes of the tree are summed (an engine with several processes on one
    card); across GPUs the max is taken (tensor parallelism never sums across cards). A
    process NVML lists without a figure is left out, as miles skips "[N/A]".

    None when it cannot measure: no root, NVML missing or failing (or slower than
    `timeout_s`), a GPU or process list NVML could not read, or no process of the tree on
    any GPU (e.g. the caller sees another PID namespace than NVML). Never 0 for that.
    """
    per_gpu = query_process_tree_gpu_used_bytes(root_pid, timeout_s)
    return None if per_gpu is None else max(per_gpu.values()) / GIB
