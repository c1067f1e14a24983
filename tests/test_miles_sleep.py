"""gate.miles_sleep against what rlops/miles' SGLangEngine (0aa0ab06,
miles/backends/sglang_utils/sglang_engine.py) does on the same inputs: a fake SGLang over real
HTTP in each release's shape, the fake NVML under the real nvidia-ml-py, real process trees."""

from __future__ import annotations

import logging
import os

import pytest
import requests

from gate.miles_sleep import (
    assert_post_sleep_vram_below_threshold,
    log_post_sleep_residual_diagnostics,
    log_whole_gpu,
    whole_gpu_audit,
)

GIB = 1024**3
MIB = 1024**2


def miles_sum(base_url: str) -> float:
    """What miles computes from /server_info, on its inputs: per DP rank, weight, kvcache and graph
    each through float() (absent or falsy: 0), the max over ranks."""
    body = requests.get(f"{base_url}/server_info", timeout=5).json()
    return max(
        sum(float(state["memory_usage"].get(name, 0.0) or 0.0) for name in ("weight", "kvcache", "graph"))
        for state in body["internal_states"]
    )


@pytest.mark.parametrize(
    "mode, dp_size, expected",
    [
        ("mid", 1, 14.5 + 55.25 + 1.25),  # `cuda_graph`: miles reads no graph, so it says 69.75
        ("new", 1, 14.5 + 55.25 + 0.75 + 0.5),  # SGLang PR #33375's per-phase `graph` dict
        ("new", 2, 14.5 + 56.25 + 0.75 + 0.5),  # the max over DP ranks
    ],
)
def test_server_info_is_summed_on_every_shape_where_miles_raises_or_misses(fake_sglang, mode, dp_size, expected):
    server = fake_sglang(mode, dp_size)
    assert assert_post_sleep_vram_below_threshold(server.url, threshold_gb=100.0) == expected
    if mode == "new":
        with pytest.raises(TypeError, match=r"float\(\) argument must be a string or a .*number, not 'dict'"):
            miles_sum(server.url)
    else:
        assert miles_sum(server.url) == expected - 1.25, "miles leaves the graph out when it is `cuda_graph`"


def test_threshold_and_raise_contract_as_miles(fake_sglang):
    server = fake_sglang("new", 2)  # 72.0 GiB on DP rank 1
    assert assert_post_sleep_vram_below_threshold(server.url, 72.0) == 72.0, "exactly at the threshold passes"
    host_port = server.url.removeprefix("http://")
    with pytest.raises(
        RuntimeError,
        match=rf"^Post-sleep VRAM 72\.000 GiB \(max across DPs, weight\+kvcache\+graph\) exceeds threshold 71\.500 "
        rf"GiB on engine {host_port} — torch_memory_saver may have leaked",
    ):
        assert_post_sleep_vram_below_threshold(server.url, 71.5)


@pytest.mark.parametrize(
    "mode, error, message",
    [
        ("shape", RuntimeError, "^/server_info response missing 'internal_states' list"),
        ("status500", requests.HTTPError, "500 Server Error"),  # miles: raise_for_status
        ("old", requests.HTTPError, "404 Client Error"),  # only /get_server_info: miles asks /server_info too
        ("garbage", ValueError, None),  # miles: response.json(), a JSONDecodeError (a ValueError)
    ],
)
def test_bad_answers_raise_as_miles_does(fake_sglang, mode, error, message):
    with pytest.raises(error, match=message):
        assert_post_sleep_vram_below_threshold(fake_sglang(mode).url, 1.0)


@pytest.fixture
def probe(nvml, monkeypatch):
    import exporter.gpu_probe

    monkeypatch.setattr(exporter.gpu_probe, "_sources", {})  # a source started before the fake NVML was loaded
    return nvml


def test_diagnostics_measure_the_tree_per_gpu_beside_whole_gpu_and_accounting(probe, spawn_tree, fake_sglang, caplog):
    caplog.set_level(logging.INFO, logger="gate.miles_sleep")
    tree = spawn_tree(leaves=2)
    gpu0, gpu1 = probe.gpus
    gpu0.processes = [(tree.leaves[0], 512 * MIB), (os.getpid(), 4 * GIB)]  # the trainer's 4 GiB is not the engine's
    gpu1.processes = [(tree.leaves[1], 1536 * MIB)]
    gpu0.used, gpu1.used = 5 * GIB, 2 * GIB
    probe.write()
    server = fake_sglang("new")
    assert log_post_sleep_residual_diagnostics(tree.pid, server.url, threshold_gb=7.0) == 1.5
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert f"'{gpu0.uuid}': '0.500 GiB (whole GPU 5.000 GiB)'" in line
    assert f"'{gpu1.uuid}': '1.500 GiB (whole GPU 2.000 GiB)'" in line
    assert "server_info_accounting(weight+kvcache+graph)=71.000 GiB whole_gpu_threshold=7.000 GiB" in line
    with pytest.raises(TypeError):
        miles_sum(server.url)  # where miles' diagnostic raises instead of logging


def test_diagnostics_that_cannot_measure_say_so_and_never_raise(probe, spawn_tree, fake_sglang, caplog):
    caplog.set_level(logging.INFO, logger="gate.miles_sleep")
    tree = spawn_tree()
    probe.gpus[0].processes = [(os.getpid(), GIB)]  # nothing of the tree on any GPU: unknown, not 0
    probe.write()
    assert log_post_sleep_residual_diagnostics(tree.pid, fake_sglang("status500").url) is None
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert "process_resident=n/a GiB" in info[0] and "server_info_accounting(weight+kvcache+graph)=n/a" in info[0]
    assert any("diagnostic unavailable" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_whole_gpu_before_and_after_for_indices_and_uuids(probe, monkeypatch, capsys):
    gpu0, gpu1 = probe.gpus
    gpu0.used, gpu1.used = 10 * GIB, 3 * GIB
    probe.write()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"1,{gpu0.uuid}")  # miles looks UUIDs up by index: "None MiB"
    assert log_whole_gpu("before release_memory_occupation", engine="e:1") == {"1": 3072.0, gpu0.uuid: 10240.0}
    line = capsys.readouterr().out.strip()
    shown = f"{{'1': '3072 MiB', '{gpu0.uuid}': '10240 MiB'}}"
    assert line == f"[SGL-OFFLOAD-AUDIT] before release_memory_occupation engine=e:1 gpus={shown}"
    with whole_gpu_audit("release_memory_occupation", engine="e:1", gpus=[0]) as audit:
        gpu0.used = GIB
        probe.write()
    assert audit.before == {"0": 10240.0} and audit.after == {"0": 1024.0}
    assert audit.returned_mib() == {"0": 9216.0}
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" engine=")[0] for line in out] == [
        "[SGL-OFFLOAD-AUDIT] before release_memory_occupation",
        "[SGL-OFFLOAD-AUDIT] after release_memory_occupation",
    ]


def test_whole_gpu_probe_failure_is_a_line_not_an_exception(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPU_RESIDENCY_GATE_SOURCE", "nvidia-smi")
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    assert log_whole_gpu("after resume_memory_occupation", gpus=[0]) == {}
    assert capsys.readouterr().out.startswith("[SGL-OFFLOAD-AUDIT] after resume_memory_occupation: probe failed ")
