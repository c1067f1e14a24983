"""Calls that may never return (a GPU in a bad state hangs NVML calls), run with a deadline.

A hung C call cannot be interrupted from Python, so the call runs on one daemon thread
of its own and the caller waits at most `timeout`. While that thread is stuck past a
caller's deadline, further calls fail at once instead of queueing behind it; when it comes
back, calls work again. The thread is a daemon: a hung driver never keeps the process from exiting.

The thread can also do work of its own when no call came for a while (`when_quiet`): a periodic
read between scrapes then costs one thread's wake-up, not two, and none while calls come often.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

# quiet work: returns the seconds until it wants to run again, or None (not until a call came and went quiet)
QuietWork = Callable[[], float | None]


class DeadlineExceeded(TimeoutError):
    """The call did not return in time (`busy`: an earlier call is still stuck)."""

    def __init__(self, message: str, busy: bool = False) -> None:
        super().__init__(message)
        self.busy = busy


class DeadlineRunner:
    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._busy_since: float | None = None  # monotonic start of what the thread runs now
        self._guard = threading.Lock()  # one caller at a time hands work to the thread
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()  # callers and when_quiet may both start the thread: once
        self._quiet: tuple[float, QuietWork] | None = None

    def when_quiet(self, after: float, work: QuietWork | None) -> None:
        """Run `work` on this thread once no call came for `after` seconds, then again when it asks
        (None: stop). Its NVML calls are this thread's own: `call` runs them at once."""
        self._quiet = (after, work) if work is not None else None
        self._start()
        self._jobs.put(None)  # the thread looks at its quiet work now

    def _start(self) -> None:
        with self._starting:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        wait: float | None = None
        while True:
            quiet = self._quiet
            try:
                job = self._jobs.get(timeout=wait if quiet is not None else None)
            except queue.Empty:
                job = None
                wait = self._run_quiet(quiet[1])
            else:
                wait = quiet[0] if quiet is not None else None  # quiet again only after `after` seconds
            if job is None:
                continue
            call, done, box = job
            self._busy_since = time.monotonic()
            try:
                box.append((True, call()))
            except BaseException as exc:  # handed back to the caller, who re-raises it
                box.append((False, exc))
            finally:
                self._busy_since = None
                done.set()

    def _run_quiet(self, work: QuietWork) -> float | None:
        self._busy_since = time.monotonic()
        try:
            return work()
        except Exception:  # its owner supervises it; a failure here must not end the thread
            log.exception("%s: quiet work failed", self._name)
            return None
        finally:
            self._busy_since = None

    def call(self, fn: Callable[[], T], timeout: float) -> T:
        """fn() on the worker thread; DeadlineExceeded if it takes longer than `timeout` seconds.
        From the worker thread itself (quiet work), fn() at once."""
        if threading.current_thread() is self._thread:
            return fn()
        with self._guard:
            since = self._busy_since
            if since is not None and time.monotonic() - since > timeout:
                raise DeadlineExceeded(f"{self._name}: an earlier call has not returned yet", busy=True)
            self._start()
            done, box = threading.Event(), []
            self._jobs.put((fn, done, box))
            if not done.wait(timeout):
                raise DeadlineExceeded(f"{self._name}: no answer in {timeout:g}s")
        ok, value = box[0]
        if ok:
            return value
        raise value
