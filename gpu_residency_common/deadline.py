"""Calls that may never return (a GPU in a bad state hangs NVML calls), run with a deadline.

A hung C call cannot be interrupted from Python, so the call runs on one daemon thread
of its own and the caller waits at most `timeout`. While that thread is still stuck,
further calls fail at once instead of queueing behind it; when it comes back, calls work
again. The thread is a daemon: a hung driver never keeps the process from exiting.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class DeadlineExceeded(TimeoutError):
    """The call did not return in time (`busy`: an earlier call is still stuck)."""

    def __init__(self, message: str, busy: bool = False) -> None:
        super().__init__(message)
        self.busy = busy


class DeadlineRunner:
    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._guard = threading.Lock()  # one caller at a time hands work to the thread
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while True:
            call, done, box = self._jobs.get()
            try:
                box.append((True, call()))
            except BaseException as exc:  # handed back to the caller, who re-raises it
                box.append((False, exc))
            finally:
                self._idle.set()
                done.set()

    def call(self, fn: Callable[[], T], timeout: float) -> T:
        """fn() on the worker thread; DeadlineExceeded if it takes longer than `timeout` seconds."""
        with self._guard:
            if not self._idle.is_set():
                raise DeadlineExceeded(f"{self._name}: an earlier call has not returned yet", busy=True)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            done, box = threading.Event(), []
            self._idle.clear()
            self._jobs.put((fn, done, box))
            if not done.wait(timeout):
                raise DeadlineExceeded(f"{self._name}: no answer in {timeout:g}s")
        ok, value = box[0]
        if ok:
            return value
        raise value
