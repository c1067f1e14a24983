"""Residual creep (issue 35): what each release leaves behind, cycle after cycle, on real process
trees, the fake NVML, the exporter as a process and a real Prometheus loading the project's rules
and alerts; the history survives an exporter restart, and the gate names the creeping engine."""

from __future__ import annotations

import json
import random
import re
import time

import pytest
import requests
from conftest import ROOT, gate_waiting_for, one, scrape_until, values

from exporter.errors import ErrorCounter
from exporter.registry import register_engine, set_engine_state
from exporter.sleep_wake.cycle_state import decode, encode
from exporter.sleep_wake.cycles import CycleHistory, growth_per_cycle
from fakenvml import GIB

MIB = 1024**2
DASHBOARDS = ROOT / "dashboards"
CREEP, STEADY = "rollout-creep", "trainer"
CYCLES = 12
START = 500 * MIB  # the creeping engine's first residual; +120 MiB a cycle stays under 2 GiB for 12 cycles
STEP = 120 * MIB
BASE = 600 * MIB  # the trainer's residual, +-50 MiB of noise around it
_rng = random.Random(35)
NOISE = [int(_rng.uniform(-50, 50) * MIB) for _ in range(CYCLES + 2)]  # by cycle number
ALERT = 'ALERTS{{alertname="GpuEngineResidualCreeping",engine="{}"}}'


def _hold(scenario, trees, held: dict[str, int]) -> None:
    """Each engine's one process holds `held[engine]` bytes, engine i on GPU i."""
    for index, (name, tree) in enumerate(trees.items()):
        scenario.gpus[index].processes = [(tree.leaves[0], held[name])]
        scenario.gpus[index].used = held[name] + GIB // 4
    scenario.write()


def _cycle(exporter, scenario, trees, registry, number: int) -> None:
    """Awake with their full memory, then asleep: the release leaves each engine's residual for `number`."""
    _hold(scenario, trees, {CREEP: 20 * GIB, STEADY: 30 * GIB})
    for name in trees:
        set_engine_state(name, "active", registry)
    for name in trees:
        set_engine_state(name, "asleep", registry)  # the release call returned; the memory goes just after
    _hold(scenario, trees, {CREEP: START + (number - 1) * STEP, STEADY: BASE + NOISE[number]})
    scrape_until(
        exporter,
        lambda m: all(values(m, "gpu_residency_engine_release_cycles_total", engine=n) == [number] for n in trees),
    )


def test_a_creeping_engine_alerts_before_the_floor_a_jittering_trainer_never_and_a_restart_keeps_the_history(
    exporter_factory, scenario, spawn_tree, tmp_path, prometheus_factory
):
    registry, state = tmp_path / "reg", tmp_path / "state"
    trees = {CREEP: spawn_tree(), STEADY: spawn_tree(title="ray::MegatronTrainRayActor.train")}
    register_engine(CREEP, root_pid=trees[CREEP].pid, directory=registry, state="active")
    # A trainer registered as an engine: its offload is its sleep.
    register_engine(STEADY, root_pid=trees[STEADY].pid, kind="trainer", directory=registry, state="active")
    _hold(scenario, trees, {CREEP: 20 * GIB, STEADY: 30 * GIB})
    flags = ("--registry.dir", str(registry), "--no-engines.discover", "--engines.state-interval", "0.05",
             "--state.dir", str(state))  # fmt: skip
    exporter = exporter_factory(scenario, *flags)
    prometheus = prometheus_factory(
        [exporter.url.removeprefix("http://")], rule_files=[DASHBOARDS / "rules.yaml", DASHBOARDS / "alerts.yaml"]
    )
    prometheus.wait_for("gpu_residency_engine_release_floor_bytes == 2 * 1024 ^ 3")

    fired_at = None
    for number in range(1, CYCLES + 1):
        _cycle(exporter, scenario, trees, registry, number)
        prometheus.wait_for(f'gpu_residency_engine_release_cycles_total{{engine="{CREEP}"}} >= {number}')
        if number == 10:  # the first full window: the growth is published, the alert fires on its next evaluation
            prometheus.wait_for(ALERT.format(CREEP).replace("}", ',alertstate="firing"}'), timeout=20)
        if fired_at is None and prometheus.query(ALERT.format(CREEP)):
            fired_at = number
    assert fired_at == 10, fired_at
    m = exporter.scrape()
    residual = one(m, "gpu_residency_engine_release_residual_bytes", engine=CREEP, gpu="0")
    assert residual == START + (CYCLES - 1) * STEP < 2 * GIB  # still under the floor: no release timed out
    assert one(m, "gpu_residency_engine_release_residual_growth_bytes_per_cycle", engine=CREEP) == pytest.approx(STEP)
    assert abs(one(m, "gpu_residency_engine_release_residual_growth_bytes_per_cycle", engine=STEADY)) < 32 * MIB
    assert one(m, "gpu_residency_engine_release_timeouts_total", engine=CREEP) == 0

    # The annotation: the rate, the residual now, the cycles left before the floor (re-rendered at each evaluation).
    creeping = _alerts_until(prometheus, lambda alerts: "1.777GiB" in str(alerts))
    assert [a["labels"]["engine"] for a in creeping] == [CREEP], creeping
    description = creeping[0]["annotations"]["description"]
    assert "grown by 120MiB a cycle; it is now 1.777GiB" in description, description
    assert "reaches the release floor in 2 cycles" in description, description
    # The jittering trainer never fired, not even once, at any cycle.
    assert not prometheus.query(f"count_over_time({ALERT.format(STEADY)}[10m])")

    # The gate, waiting for the creeping engine's release, says it creeps: from Prometheus, and from the
    # exporter's own API.
    creeps = (
        f"{CREEP} still holds 1.8 GiB on GPU 0 (pid {trees[CREEP].leaves[0]} sglang::scheduler_TP0) (creeping: "
        "each release leaves 120 MiB more)"
    )
    for source in (("--prometheus-url", prometheus.url), ("--exporter-url", exporter.url)):
        gate = gate_waiting_for(scenario, CREEP, "0", "1", *source)
        assert gate.returncode == 1 and creeps in gate.stdout, gate.stdout + gate.stderr

    # A restart keeps the history: the count goes on, the window spans the restart.
    exporter.stop()
    again = exporter_factory(scenario, *flags)
    m = scrape_until(again, lambda m: values(m, "gpu_residency_engine_release_cycles_total", engine=CREEP) == [12])
    assert one(m, "gpu_residency_engine_release_residual_bytes", engine=CREEP) == residual
    _cycle(again, scenario, trees, registry, CYCLES + 1)
    m = again.scrape()
    assert one(m, "gpu_residency_engine_release_residual_growth_bytes_per_cycle", engine=CREEP) == pytest.approx(STEP)


def _alerts_until(prometheus, ready, timeout: float = 20.0) -> list[dict]:
    """The firing GpuEngineResidualCreeping alerts once `ready(alerts)` (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        alerts = requests.get(f"{prometheus.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        creeping = [a for a in alerts if a["labels"]["alertname"] == "GpuEngineResidualCreeping"]
        if ready(creeping) or time.monotonic() > deadline:
            return creeping
        time.sleep(0.2)


def test_the_growth_is_a_least_squares_slope_that_bounded_noise_barely_moves():
    steady = [(cycle, BASE + noise) for cycle, noise in enumerate(NOISE[:10], start=1)]
    worst = [(cycle, BASE + (50 if cycle > 5 else -50) * MIB) for cycle in range(1, 11)]
    assert abs(growth_per_cycle(steady)) < 32 * MIB
    assert growth_per_cycle(worst) == pytest.approx(50 * MIB * 25 / 82.5)  # 15 MiB: the most +-50 can fake at 10
    assert growth_per_cycle([(c, START + c * STEP) for c in (3, 4, 7, 9, 12)]) == pytest.approx(STEP)


def test_the_state_file_keeps_the_newest_engines_within_its_limit():
    from exporter.sleep_wake.cycle_state import EngineCycles, GpuResiduals

    history = {
        f"e{i}": EngineCycles(i + 1, float(i), {"GPU-a": GpuResiduals(0, [(c, c * MIB) for c in range(10)])})
        for i in range(50)
    }
    text = encode(history, limit=2000)
    assert len(text) <= 2000
    kept = decode(json.loads(text), window=5)
    assert kept and set(kept) == {f"e{i}" for i in range(50 - len(kept), 50)}  # the newest
    assert kept["e49"].gpus["GPU-a"].points == [(c, c * MIB) for c in range(5, 10)]  # the last `window`


def _released(engine: str, used: int):
    """A snapshot in which `engine` holds `used` bytes on GPU 0 (GPU-a): what a release completes on."""
    from exporter.snapshot.attribution import EngineUsage, Snapshot
    from exporter.sources.nvml import GpuReading, NvmlReading

    gpu = GpuReading(0, "GPU-a", "00000000:18:00.0", "fake", used, 80 * GIB, 0, ())
    return Snapshot(NvmlReading(True, (gpu,)), (), (), (EngineUsage(engine, gpu, used),), ())


def test_a_release_timed_again_after_a_restart_is_one_cycle(tmp_path):
    """An exporter restarted within moments of a release times it again (a state change just before
    start-up counts as seen): the history, read back, knows that sleep was counted."""
    first = CycleHistory("n", 2 * GIB, 5, tmp_path, ErrorCounter())
    first.record("e", {"GPU-a": START}, _released("e", START), since=100.0)
    first.record("e", {"GPU-a": START}, _released("e", START), since=100.0)
    again = CycleHistory("n", 2 * GIB, 5, tmp_path, ErrorCounter())
    again.record("e", {"GPU-a": START}, _released("e", START), since=100.0)
    again.record("e", {"GPU-a": START + STEP}, _released("e", START + STEP), since=200.0)
    assert decode(json.loads((tmp_path / "cycles.json").read_text()), 5)["e"].count == 2


def test_the_history_keeps_the_newest_engines_and_a_bad_file_costs_only_itself(tmp_path, monkeypatch):
    monkeypatch.setattr("exporter.sleep_wake.cycles.MAX_ENGINES", 3)
    history = CycleHistory("n", 2 * GIB, 5, tmp_path, ErrorCounter())
    for n in range(5):
        history.record(f"e{n}", {"GPU-a": START}, _released(f"e{n}", START), since=float(n))
    assert set(decode(json.loads((tmp_path / "cycles.json").read_text()), 5)) == {"e2", "e3", "e4"}

    (tmp_path / "cycles.json").write_text('{"version": 1, "engines": [["e", "many"]]}')
    errors = ErrorCounter()
    fresh = CycleHistory("n", 2 * GIB, 5, tmp_path, errors)
    assert errors.snapshot() == {("cycles_state", "malformed"): 1}
    fresh.record("e", {"GPU-a": START}, _released("e", START), since=1.0)  # starts again, and saves
    assert decode(json.loads((tmp_path / "cycles.json").read_text()), 5)["e"].count == 1


def test_the_gate_calls_creeping_what_the_alert_does():
    import yaml

    from gate.readings import CREEP_BYTES_PER_CYCLE

    rules = {
        r.get("alert"): r
        for g in yaml.safe_load((DASHBOARDS / "alerts.yaml").read_text())["groups"]
        for r in g["rules"]
    }
    mib = re.fullmatch(r".*\) > (\d+) \* 1024 \^ 2", rules["GpuEngineResidualCreeping"]["expr"].strip())
    assert mib and int(mib.group(1)) * MIB == CREEP_BYTES_PER_CYCLE
