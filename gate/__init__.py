"""The residual-memory gate: block a wake-up onto shared GPUs until their memory is really free.

    from gate import ResidualGate
    gate = ResidualGate.from_env()
    gate.wait(gpus=[0, 3], node="n1", timeout=120)     # raises GateTimeout(decision)

Importing this package needs only the standard library; a source's own dependency
(nvidia-ml-py for the NVML source) is imported when that source is built.
"""

from gate.compat import (
    parse_env_positive_float,
    probe_max_used_gpu_mem_gb,
    wait_for_residual,
    wait_for_residual_or_proceed,
)
from gate.core import ResidualGate
from gate.decision import Decision, GateTimeout, GpuVerdict
from gate.readings import GpuSample, Holder, SourceError
from gate.settings import GateConfigError

__all__ = [
    "Decision",
    "GateConfigError",
    "GateTimeout",
    "GpuSample",
    "GpuVerdict",
    "Holder",
    "ResidualGate",
    "SourceError",
    "parse_env_positive_float",
    "probe_max_used_gpu_mem_gb",
    "wait_for_residual",
    "wait_for_residual_or_proceed",
]
