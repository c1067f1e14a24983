"""A deadline of the child's own, so nothing a test or benchmark starts outlives it even when the
fixture that should stop it never runs (a killed pytest, a crashed benchmark).

`with_alarm` keeps the PID (tests read /proc/<pid> of the process they started): a tiny Python
hop sets an alarm and execs the command; the alarm survives exec and, unhandled, ends the
process. It suits programs that leave SIGALRM at its default (Python, shells, util-linux). Go
programs (Prometheus, Alertmanager) ignore SIGALRM: `with_timeout` runs them under coreutils'
timeout, which forwards SIGTERM, so stopping the wrapper stops them.
"""

from __future__ import annotations

import sys

ALARM_THEN_EXEC = "import os, signal, sys; signal.alarm(int(sys.argv[1])); os.execvp(sys.argv[2], sys.argv[2:])"


def with_alarm(command: list[str], seconds: float) -> list[str]:
    """`command` with a SIGALRM deadline of `seconds`, same PID."""
    return [sys.executable, "-c", ALARM_THEN_EXEC, str(max(1, int(seconds))), *command]


def with_timeout(command: list[str], seconds: float) -> list[str]:
    """`command` under timeout(1): SIGTERM after `seconds`, SIGKILL 10 s later."""
    return ["timeout", "--kill-after=10", str(max(1, int(seconds))), *command]
