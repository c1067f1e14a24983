"""What an engine's exit code means, in words a human reads in a framework's log.

Negative codes are signals (multiprocessing / subprocess convention); 128+N is a signal as a
shell reports it. Standard library only: frameworks import it through exporter.exits.
"""

from __future__ import annotations

import signal

_HINTS = {
    # Not "an OOM kill": SGLang's launcher SIGKILLs its own tree when a scheduler child fails.
    signal.SIGKILL: "killed by SIGKILL: the kernel OOM killer (host or cgroup memory), SGLang's launcher killing "
    "its tree after a scheduler failed, or an outside kill (operator, Ray); when the exporter runs, its crash "
    "forensics (`gpu-residency-exporter exits`, /api/v1/exits) can tell which",
    signal.SIGSEGV: "a crash in native code (CUDA, NCCL or a kernel extension)",
    signal.SIGABRT: "an abort, often a failed CUDA/NCCL assertion",
    signal.SIGBUS: "a bus error, often exhausted shared memory (/dev/shm)",
    signal.SIGTERM: "asked to stop (SIGTERM), by the framework, Kubernetes or a user",
    signal.SIGINT: "interrupted (SIGINT)",
}


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_exit(
    exitcode: int | None,
    elapsed: float | None = None,
    url: str | None = None,
    phase: str = "during start-up",
    evidence: dict | None = None,
) -> str:
    """One line for a human: how the engine ended, when, where, and what it can mean, or, with the
    exporter's record of the exit (`evidence`, see exporter_evidence), what it found.

    Negative codes are signals (multiprocessing / subprocess convention); 128+N is a
    signal as a shell reports it.
    """
    detail, hint = _explain(exitcode)
    detail = detail or "no exit status: still running, or not its parent"
    parts = [f"terminated {phase}: exitcode={exitcode} ({detail})"]
    if elapsed is not None:
        parts.append(f"elapsed={elapsed:.1f}s")
    if url:
        parts.append(f"url={url}")
    text = ", ".join(parts)
    if evidence and evidence.get("cause") not in (None, "unknown"):
        return with_evidence(text, evidence)
    return f"{text}; {hint}" if hint else text


def _explain(exitcode: int | None) -> tuple[str, str]:
    """(what the code means, the likely cause): ("killed by SIGKILL", "killed by SIGKILL: the kernel ...")."""
    if exitcode is None:
        return "", ""
    if exitcode < 0:
        return f"killed by {signal_name(-exitcode)}", _HINTS.get(-exitcode, "")
    if 128 < exitcode < 128 + 65:
        signum = exitcode - 128
        return f"128+{signum}: killed by {signal_name(signum)}, as a shell reports it", _HINTS.get(signum, "")
    if exitcode == 0:
        return "exited normally", "it stopped on its own before it was expected to"
    return f"exited with status {exitcode}", "see the engine's own log for the error"


def terminated_message(phase: str, exitcode: int | None, elapsed: float, url: str) -> str:
    """miles' wording (its PR #572), so searches of existing logs keep matching, with our cause:
    "Server process terminated unexpectedly during flush_cache. exitcode=-9, elapsed=3.2s,
    url=http://h:30000 (killed by SIGKILL); killed by SIGKILL: the kernel OOM killer ..."."""
    detail, hint = _explain(exitcode)
    text = f"Server process terminated unexpectedly during {phase}. "
    text += f"exitcode={exitcode}, elapsed={elapsed:.1f}s, url={url}"
    if detail:
        text += f" ({detail})"
    return f"{text}; {hint}" if hint else text


def exit_labels(exitcode: int | None) -> tuple[str, str]:
    """(exit_code, signal) label values: ('-9', 'SIGKILL'), ('3', ''), ('unknown', '')."""
    if exitcode is None:
        return "unknown", ""
    if exitcode < 0:
        return str(exitcode), signal_name(-exitcode)
    return str(exitcode), ""


def with_evidence(message: str, record: dict | None) -> str:
    """The message, and what the exporter found, when it found something."""
    if not record or record.get("cause") in (None, "unknown"):
        return message
    return f"{message}. The exporter found: {record['cause']}: {record.get('detail', '')}"
