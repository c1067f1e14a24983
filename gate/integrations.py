"""One-line guards for frameworks that wake an engine with no check at all (verl, OpenRLHF, TRL,
ROLL, AReaL): the wake-up waits until the GPUs it lands on are under the threshold.

    from gate.integrations import guard_wake, guarded

    guard_wake(llm, "wake_up")                      # TRL: self.llm.wake_up(tags=["weights"]) now waits first
    @guarded() async def wake_up(self): ...         # verl: an async wake-up, decorated
    with wake_guard(): engine.wake_up()              # any call site, as a block

Nothing here imports a framework. The GPUs are this process's (`$CUDA_VISIBLE_DEVICES`, as
Ray and the launchers set it, else every GPU it sees) unless given; the threshold, source and
timeout come from the environment as for ResidualGate.from_env. A timeout raises GateTimeout
before the wake-up runs: the engine stays asleep rather than OOM the card.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from gate.compat import wait_for_residual
from gate.settings import DEFAULT_THRESHOLD_GB, parse_threshold, threshold_from_env

DEFAULT_TIMEOUT_S = 120.0
F = TypeVar("F", bound=Callable[..., Any])


def this_process_gpus() -> list[str]:
    """The GPUs this process runs on: `$CUDA_VISIBLE_DEVICES` (indices or UUIDs, as Ray and
    torchrun set it; indices taken as NVML's, which they are with CUDA_DEVICE_ORDER=PCI_BUS_ID),
    else every GPU in this process's view."""
    visible = [item.strip() for item in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if item.strip()]
    if visible:
        return visible
    from gate.identity import local_view

    view = local_view()
    if view is not None and view.uuids:
        return [view.uuids[index] for index in sorted(view.uuids)]
    if view is not None:
        return list(view.visible_uuids) or [str(i) for i in range(len(view.host_indices))]
    raise RuntimeError("cannot tell which GPUs this process uses: pass gpus=[...] (indices or UUIDs)")


def _threshold(threshold_gb: float | None) -> float:
    if threshold_gb is not None:
        return parse_threshold(threshold_gb, "threshold_gb")
    from_env = threshold_from_env()
    return DEFAULT_THRESHOLD_GB if from_env is None else from_env


def wait_before_wake(
    gpus: Sequence[int | str] | None = None, threshold_gb: float | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> float:
    """Block until the GPUs are clear (GiB used, the max); GateTimeout when time runs out."""
    ids = list(gpus) if gpus is not None else this_process_gpus()
    return wait_for_residual(ids, _threshold(threshold_gb), timeout_s=timeout_s)


def guarded(
    gpus: Sequence[int | str] | None = None, threshold_gb: float | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> Callable[[F], F]:
    """A decorator: the wrapped wake-up runs only once the GPUs are clear. An async wake-up (or a
    sync front of one, as verl's `@auto_await` methods are: awaitable inside a running loop, run
    to completion outside) waits on a thread inside a loop, so the loop keeps running."""

    def wait() -> None:
        wait_before_wake(gpus, threshold_gb, timeout_s)

    def decorate(wake: F) -> F:
        if inspect.iscoroutinefunction(wake):

            @functools.wraps(wake)
            async def async_guarded(*args: Any, **kwargs: Any) -> Any:
                await asyncio.to_thread(wait)
                return await wake(*args, **kwargs)

            return async_guarded  # type: ignore[return-value]

        fronts_async = _fronts_a_coroutine(wake)

        @functools.wraps(wake)
        def sync_guarded(*args: Any, **kwargs: Any) -> Any:
            if fronts_async and _in_running_loop():

                async def after_wait() -> Any:  # what the caller awaits, as it would await the original
                    await asyncio.to_thread(wait)
                    result = wake(*args, **kwargs)
                    return await result if inspect.isawaitable(result) else result

                return after_wait()
            wait()
            return wake(*args, **kwargs)

        return sync_guarded  # type: ignore[return-value]

    return decorate


def _fronts_a_coroutine(function: Callable[..., Any]) -> bool:
    """A sync function wrapping a coroutine function (functools.wraps leaves `__wrapped__`)."""
    for _ in range(8):
        function = getattr(function, "__wrapped__", None)
        if function is None:
            return False
        if inspect.iscoroutinefunction(function):
            return True
    return False


def _in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def guard_wake(engine: object, method: str = "wake_up", **options: Any) -> None:
    """Make `engine.<method>` wait for clear GPUs first, on this object only (a vLLM `LLM`, an
    OpenRLHF or ROLL engine actor's instance): the one line to add where the framework builds it."""
    original = getattr(engine, method)
    if getattr(original, "__gate_guarded__", False):
        return  # guarded already: twice would wait twice
    wrapped = guarded(**options)(original)
    wrapped.__gate_guarded__ = True  # type: ignore[attr-defined]
    setattr(engine, method, wrapped)


@contextlib.contextmanager
def wake_guard(
    gpus: Sequence[int | str] | None = None, threshold_gb: float | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> Iterator[float]:
    """`with wake_guard(): engine.wake_up()`: the block runs once the GPUs are clear (the max GiB
    used is what it yields)."""
    yield wait_before_wake(gpus, threshold_gb, timeout_s)
