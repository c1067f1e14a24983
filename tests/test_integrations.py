"""The one-line guards for frameworks that wake engines with no check (gate.integrations), driven
through each framework's call shape with a fake engine on the fake NVML."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import threading
import time

import pytest

import fakenvml
from fakenvml import GIB
from gate import GateTimeout
from gate.integrations import guard_wake, guarded, wake_guard


@pytest.fixture
def held(fake_nvml_dir, scenario, monkeypatch):
    """GPU 0 held (10 GiB) until `free()`; the process's own GPU is 0, read by local NVML."""
    monkeypatch.setenv("FAKE_NVML_SCENARIO", str(scenario.path))
    ctypes.CDLL(str(fake_nvml_dir / fakenvml.SONAME))  # the binding's dlopen by soname finds this
    monkeypatch.setenv("GPU_RESIDENCY_GATE_SOURCE", "nvml")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    scenario.gpus[0].used = 10 * GIB
    scenario.write()
    freed: list[float] = []

    def free(after: float) -> None:
        def drop() -> None:
            scenario.gpus[0].used = GIB // 2
            freed.append(time.monotonic())  # before the write: no wake-up can come before this time
            scenario.write()

        threading.Timer(after, drop).start()

    return free, freed


class FakeLLM:
    """vLLM's LLM as TRL and OpenRLHF hold it: sleep(level) and wake_up(tags)."""

    def __init__(self) -> None:
        self.woken: list[tuple[float, object]] = []

    def wake_up(self, tags=None) -> None:
        self.woken.append((time.monotonic(), tags))


def test_trl_sync_weights_wakes_only_after_the_memory_is_gone(held):
    free, freed = held
    llm = FakeLLM()
    guard_wake(llm)  # the one line, where TRL's VLLMGeneration builds self.llm
    guard_wake(llm)  # twice is once
    free(0.5)
    llm.wake_up(tags=["weights"])  # VLLMGeneration.sync_weights: empty_cache(), then this
    ((woken_at, tags),) = llm.woken
    assert tags == ["weights"] and freed and woken_at >= freed[0]


def test_a_wake_that_times_out_never_runs(held):
    llm = FakeLLM()
    guard_wake(llm, timeout_s=0.5)
    with pytest.raises(GateTimeout, match="GPU 0"):
        llm.wake_up(tags=["weights"])
    assert llm.woken == [], "the engine stays asleep rather than OOM the card"


def auto_await(method):
    """verl's decorator on CheckpointEngineManager's methods: awaitable inside a running loop, run to
    completion outside one."""

    @functools.wraps(method)
    def front(*args, **kwargs):
        coroutine = method(*args, **kwargs)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coroutine)
        return coroutine

    return front


class CheckpointEngineManager:
    """verl/checkpoint_engine/base.py's shape: async replicas behind @auto_await."""

    def __init__(self) -> None:
        self.woken: list[float] = []

    @auto_await
    async def wake_up_replicas(self) -> None:
        self.woken.append(time.monotonic())


def test_verl_wake_up_replicas_waits_without_blocking_the_loop(held):
    free, freed = held
    manager = CheckpointEngineManager()
    guard_wake(manager, "wake_up_replicas")

    async def main() -> int:
        ticks = 0

        async def heartbeat() -> None:
            nonlocal ticks
            while not manager.woken:
                ticks += 1
                await asyncio.sleep(0.01)

        beat = asyncio.create_task(heartbeat())
        await manager.wake_up_replicas()  # as verl's trainer awaits it
        await beat
        return ticks

    free(0.5)
    ticks = asyncio.run(main())
    assert manager.woken[0] >= freed[0]
    assert ticks >= 10, "the event loop ran while the wake-up waited"
    manager.wake_up_replicas()  # outside a loop, auto_await runs it to completion: already clear, at once
    assert len(manager.woken) == 2


def test_an_async_wake_up_decorated_directly(held):
    free, freed = held
    woken: list[float] = []

    @guarded(gpus=[0])
    async def wake_up() -> None:  # a Ray async actor's method, an AReaL engine's onload
        woken.append(time.monotonic())

    free(0.3)
    asyncio.run(wake_up())
    assert woken[0] >= freed[0]


def test_openrlhf_and_roll_call_shapes_as_a_block(held):
    free, freed = held
    free(0.3)
    llm = FakeLLM()
    with wake_guard(gpus=[0]) as used_gb:  # OpenRLHF's broadcast_to_vllm: wake_up(tags=["weights"])
        llm.wake_up(tags=["weights"])
    assert used_gb < 2 and llm.woken[0][0] >= freed[0]

    class SgLangStrategy:  # ROLL: load_states wakes weights, kv_cache and cuda_graph
        def __init__(self) -> None:
            self.loaded: list[str] = []

        def load_states(self, include=None) -> None:
            self.loaded += include or ["weights", "kv_cache", "cuda_graph"]

    strategy = SgLangStrategy()
    guard_wake(strategy, "load_states", threshold_gb=2)
    strategy.load_states()
    assert strategy.loaded == ["weights", "kv_cache", "cuda_graph"]
