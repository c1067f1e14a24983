"""The cause of an engine's death, from evidence that belongs to that death only; never a guess.

- oom_kill: the kernel log names a process of the tree as killed for lack of memory, or one of
  the tree's own memory cgroups (exporter/sources/oom_evidence.py) counted an OOM kill as it died;
- child_failure: a process of the tree died with a non-zero status or by a signal, seen at least
  one look before the root died and no more than the child window (`--forensics.child-window`,
  CHILD_WINDOW_SECONDS) before it. A child that exited 0, whose status could not be read, or that
  died earlier than that is no cause: helpers come and go during an engine's life;
- exit_code: the engine exited by itself with the status its parent reported;
- unknown: anything else, a reported signal included (the `signal` label still says which):
  a SIGTERM or a SIGKILL alone does not say who sent it or why.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from exporter.exits.describe import signal_name

CAUSES = ("oom_kill", "child_failure", "exit_code", "unknown")
OOM_MARGIN_SECONDS = 5.0  # an OOM kill counted this close before a death (or after: logs lag) is its evidence
CHILD_WINDOW_SECONDS = 10.0  # a child's failure this long before the root's death can be its cause


@dataclass
class Member:
    """A process of an engine's tree, as last seen."""

    pid: int
    start_ticks: int
    title: str
    gone_at: float | None = None  # wall-clock time of the first look that found it gone
    exitcode: int | None = None  # read from its zombie (-N: killed by signal N); None: 0 or unreadable


@dataclass(frozen=True)
class HolderAt:
    kind: str  # engine | process | unattributed
    name: str
    used_bytes: int
    pid: int | None = None


@dataclass(frozen=True)
class GpuPeak:
    gpu: int
    uuid: str
    used_bytes: int
    total_bytes: int | None
    at: float  # when the peak was seen
    top_holders: tuple[HolderAt, ...]


@dataclass
class Death:
    """An engine root the exporter saw die, with what it saw around it."""

    engine: str
    root_pid: int
    start_ticks: int | None
    at: float
    members: list[Member]
    gpus: list[GpuPeak]
    oom_counted: list[tuple[float, str]] = field(default_factory=list)  # (when, cgroup counter file)


@dataclass(frozen=True)
class Evidence:
    cause: str  # one of CAUSES
    detail: str  # one line for a human
    victim_pid: int | None = None
    victim_title: str = ""
    facts: tuple[str, ...] = ()  # what was observed, each a short sentence


def zombie_exitcode(wait_status: int) -> int | None:
    """A zombie's wait status as an exit code (-N for a signal); None for 0, which the kernel also
    shows to a reader not allowed to trace the process, so it proves nothing."""
    if wait_status == 0:
        return None
    try:
        return os.waitstatus_to_exitcode(wait_status)
    except ValueError:
        return None


def _how(exitcode: int) -> str:
    return f"killed by {signal_name(-exitcode)}" if exitcode < 0 else f"exited with status {exitcode}"


def determine_cause(
    exitcode: int | None,
    death: Death | None,
    kills: list[tuple[float, int, str]] = (),
    child_window: float = CHILD_WINDOW_SECONDS,
) -> Evidence:
    """The cause of an exit from its reported code and what was observed around this death."""
    if death is not None:
        found = _from_evidence(death, kills, child_window)
        if found is not None:
            return found
    if exitcode is None:
        return Evidence("unknown", "no exit status was reported and no evidence was found")
    signum = -exitcode if exitcode < 0 else exitcode - 128 if 128 < exitcode < 128 + 65 else None
    if signum is not None:
        return Evidence(
            "unknown",
            f"killed by {signal_name(signum)}; no OOM kill in its own memory cgroups or the kernel log and no failure "
            f"in its tree within {child_window:g}s before it were seen, so who sent it is not known",
        )
    return Evidence("exit_code", f"exited with status {exitcode}")


def _from_evidence(death: Death, kills: list[tuple[float, int, str]], child_window: float) -> Evidence | None:
    recent = [m for m in death.members if m.gone_at is not None and death.at - child_window <= m.gone_at <= death.at]
    tree = {m.pid: m for m in recent}
    tree.update({m.pid: m for m in death.members if m.gone_at is None or m.pid == death.root_pid})
    first_gone = min((m.gone_at for m in recent), default=death.at)
    since = first_gone - OOM_MARGIN_SECONDS
    named = [(pid, comm) for when, pid, comm in kills if pid in tree and when >= since]
    if named:
        pid, comm = named[0]
        title = tree[pid].title or comm
        fact = f"the kernel log says pid {pid} ({comm}) was killed for lack of memory"
        return Evidence("oom_kill", f"kernel OOM killer killed pid {pid} ({title})", pid, title, (fact,))
    counted = [path for when, path in death.oom_counted if since <= when <= death.at + OOM_MARGIN_SECONDS]
    if counted:
        # The counter does not name its victim: it is one of the processes gone first. Named
        # only when that is one process (the kernel log names it, where readable).
        first = [m for m in recent if m.gone_at == first_gone]
        victim = first[0] if len(first) == 1 else None
        who = ", ".join(f"pid {m.pid} ({m.title})" for m in first)
        return Evidence(
            "oom_kill",
            f"an OOM kill in the engine's own memory cgroup; gone first: {who}",
            victim.pid if victim else None,
            victim.title if victim else "",
            (f"memory cgroup counter {counted[0]} counted an OOM kill as the tree died",),
        )
    failed = sorted(
        (m for m in recent if m.pid != death.root_pid and m.exitcode and m.gone_at < death.at),
        key=lambda m: m.gone_at,
    )
    if not failed:
        return None
    child = failed[0]
    fact = f"pid {child.pid} ({child.title}) {_how(child.exitcode)} {death.at - child.gone_at:.1f}s before the root"
    return Evidence(
        "child_failure",
        f"a process of its tree failed first: pid {child.pid} ({child.title}) {_how(child.exitcode)}",
        child.pid,
        child.title,
        (fact,),
    )


def evidence_dict(evidence: Evidence, death: Death | None) -> dict:
    """The evidence as JSON-able data (no command line, no environment: titles, PIDs, cgroup paths)."""
    body = asdict(evidence)
    body["facts"] = list(evidence.facts)
    body["gpus"] = [asdict(peak) for peak in (death.gpus if death else [])]
    body["observed_death"] = death.at if death else None
    return body
