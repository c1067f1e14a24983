"""Engine exits, from both ends. Framework side (standard library only): describe an exit code,
report an exit durably, wait for a server to become healthy (describe.py, report.py, health.py),
and the `launch` and `exits` commands. Exporter side: the events files read once each, the exit
counts and their state file, crash forensics and the cause of a death (log.py, forensics.py,
causes.py). It may import sources, engines, the snapshot and the base modules, never pollers,
collectors or web.

The framework-facing API is importable from here, as frameworks already do::

    from exporter.exits import report_exit, describe_exit, wait_server_healthy
"""

from exporter.exits.describe import describe_exit
from exporter.exits.events import ExitEvent
from exporter.exits.health import EngineExitedError, wait_server_healthy
from exporter.exits.report import exporter_evidence, fetch_exits, report_exit

__all__ = [
    "EngineExitedError",
    "ExitEvent",
    "describe_exit",
    "exporter_evidence",
    "fetch_exits",
    "report_exit",
    "wait_server_healthy",
]
