"""Who a GPU process is when nobody registered it: a name and a kind from what the node shows.

Ray, SGLang and vLLM title their processes with setproctitle (`ray::MegatronTrainRayActor.train`,
`sglang::scheduler_TP0`, `VLLM::Worker_TP1`): the title replaces the command line, and the kernel
keeps only 15 bytes of it in comm, so the title is read from /proc/<pid>/cmdline (up to the first
NUL) and nothing else of a command line is ever kept. torchrun launchers and Megatron scripts set
no title: they are recognised by their command line and named by PID (`torchrun-4120`), never by
an argument. Names are bounded and stable: a Ray actor is named by its class, whatever method
runs; rank suffixes (_TP0, _DP1_TP3) are dropped, so one engine's workers share one name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

TITLE_PREFIXES = ("ray::", "VLLM::", "sglang::", "sgl_diffusion::")
MAX_NAME = 96
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:\-]")
_RANK_SUFFIX = re.compile(r"(?:_(?:DP|PP|PCP|ATTN_CP|MOE_DP|TP|DCP|EP)\d+)+$|_\d+$")
_TORCHRUN_MODULES = ("torch.distributed.run", "torch.distributed.launch")


@dataclass(frozen=True)
class HolderId:
    kind: str  # an engine's kind, or: trainer | ray | vllm | sglang | process
    name: str


def title_from_cmdline(raw: bytes) -> str | None:
    """The title a process set for itself (the first NUL-separated field, when it carries one of
    the known prefixes), made label-safe and bounded; None for an ordinary command line."""
    first = raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    if not first.startswith(TITLE_PREFIXES):
        return None
    return _UNSAFE.sub("_", first)[:MAX_NAME]


def classify_title(title: str) -> HolderId:
    """A titled process's holder: the title without method or rank suffixes, and its kind."""
    prefix, _, rest = title.partition("::")
    if prefix == "ray":
        base = rest.split(".", 1)[0].rstrip("_") or "IDLE"  # ray::Class.method, ray::func, older ray::PPO.train()
        # Ray titles a trainer actor by its class; RL stacks name those classes *Train* (MegatronTrainRayActor).
        kind = "trainer" if "Train" in base else "ray"
        return HolderId(kind, f"ray::{base}")
    kind = "vllm" if prefix == "VLLM" else "sglang"
    base = _RANK_SUFFIX.sub("", rest) or rest
    return HolderId(kind, f"{prefix}::{base}")


def launcher_of(argv: list[str]) -> str | None:
    """'torchrun' for a torchrun / torch.distributed launcher, 'megatron' for a Megatron pretrain
    script's process; the arguments are only looked at, never kept."""
    if not argv:
        return None
    names = [os.path.basename(arg) for arg in argv[:3]]
    if "torchrun" in names[:2] or any(module in argv[:4] for module in _TORCHRUN_MODULES):
        return "torchrun"
    if any(name.startswith("pretrain_") and name.endswith(".py") for name in [os.path.basename(a) for a in argv[:4]]):
        return "megatron"
    return None


def holder_of(title: str | None, comm: str, launchers: list[tuple[int, str]]) -> HolderId:
    """The holder of a process that is in no known engine.

    `launchers`: (pid, launcher kind) of the process itself and its ancestors, nearest first.
    A title wins (a Ray actor under torchrun is still that actor); then the nearest torchrun
    (its ranks run the Megatron script too: they share the launcher's name); then the outermost
    Megatron process; else the process is named by its comm."""
    if title is not None:
        return classify_title(title)
    torchrun = [pid for pid, kind in launchers if kind == "torchrun"]
    if torchrun:
        return HolderId("trainer", f"torchrun-{torchrun[0]}")
    if launchers:
        return HolderId("trainer", f"megatron-{launchers[-1][0]}")
    return HolderId("process", comm or "unknown")
