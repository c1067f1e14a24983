"""The /metrics body of a fakenvml.vllm.FakeVllm, built with prometheus_client as vLLM builds its own:
the sleep state (one level per engine, or per resource on "main"), the sleep-mode operation timings
("main"), KV-cache accounting and a few families the exporter must skip."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from fakenvml.vllm import FakeVllm

MODEL = "Qwen/Qwen3-8B"
SLEEP_HELP = (
    "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
    "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2."
)
# vLLM's CacheConfig fields as cache_config_info labels (0.11.1; the set differs between releases).
CACHE_CONFIG = {
    "block_size": "16", "gpu_memory_utilization": "0.45", "swap_space": "4", "cache_dtype": "auto",
    "is_attention_free": "False", "num_gpu_blocks_override": "None", "sliding_window": "None",
    "enable_prefix_caching": "True", "prefix_caching_hash_algo": "sha256", "cpu_offload_gb": "0",
    "calculate_kv_scales": "False", "cpu_kvcache_space_bytes": "None", "mamba_page_size_padded": "None",
    "mamba_block_size": "None", "mamba_cache_dtype": "auto", "mamba_ssm_cache_dtype": "auto",
    "num_cpu_blocks": "None", "kv_sharing_fast_prefill": "False", "kv_cache_memory_bytes": "None",
    "kv_offloading_size": "None", "kv_offloading_backend": "None",
}  # fmt: skip
BLOCKS_PER_ENGINE = 24978
TOKENS_PER_ENGINE = 218464  # group-aware capacity (0.24+), not blocks x block size
OPERATION_BUCKETS = (0.01, 0.1, 1, 10, 30, 60, 120, 300, 600)  # vLLM's sleep-mode operation buckets
RESOURCE_STATES = {
    "scheduler": ("running", "paused"),
    "weights": ("resident", "offloaded", "discarded", "unknown"),
    "kv_cache": ("resident", "released", "unknown"),
}


class Families:
    """One /metrics body of the fake's release, built with prometheus_client as vLLM builds its own."""

    def __init__(self, fake: FakeVllm) -> None:
        self.fake = fake

    def collect(self) -> Iterable[Metric]:
        fake = self.fake
        engines = [str(rank) for rank in range(fake.dp_size)]
        running = GaugeMetricFamily(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            labels=["engine", "model_name"],
        )
        for engine in engines:
            running.add_metric([engine, MODEL], 0.0)
        yield running
        if fake.version != "0.10.2":
            sleep = GaugeMetricFamily(
                "vllm:engine_sleep_state", SLEEP_HELP, labels=["engine", "model_name", "sleep_state"]
            )
            values = fake.legacy_sleep_state()
            if fake.mode == "shape":
                values["awake"] = 2
            for engine in engines:
                for state, value in values.items():
                    sleep.add_metric([engine, MODEL, state], float(value))
            yield sleep
        if fake.version == "main":
            yield from _resource_families(fake, engines)
        usage = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels=["engine", "model_name"]
        )
        for engine in engines:
            usage.add_metric([engine, MODEL], fake.kv_usage)
        yield usage
        if fake.version == "0.10.2":
            old = GaugeMetricFamily(
                "vllm:gpu_cache_usage_perc",
                "GPU KV-cache usage. 1 means 100 percent usage.DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
                labels=["engine", "model_name"],
            )
            for engine in engines:
                old.add_metric([engine, MODEL], fake.kv_usage)
            yield old
        labels = dict(CACHE_CONFIG)
        if fake.version == "0.10.2":
            for key in ("mamba_block_size", "kv_offloading_size", "kv_offloading_backend"):
                labels.pop(key)
        blocks = BLOCKS_PER_ENGINE * (fake.dp_size if fake.version in ("0.33.0", "main") else 1)
        labels["num_gpu_blocks"] = str(blocks)
        if fake.version in ("0.33.0", "main"):
            labels["kv_cache_size_tokens"] = str(TOKENS_PER_ENGINE)
            labels["kv_cache_max_concurrency"] = "5.33"
        names = sorted(labels)
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", labels=[*names, "engine"]
        )
        for engine in engines:
            info.add_metric([labels[name] for name in names] + [engine], 1.0)
        yield info
        tokens = CounterMetricFamily("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                     labels=["engine", "model_name"])  # fmt: skip
        latency = HistogramMetricFamily("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in "
                                        "seconds.", labels=["engine", "model_name"])  # fmt: skip
        for engine in engines:
            tokens.add_metric([engine, MODEL], 1234.0)
            buckets = [(str(b), 3.0) for b in (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0)]
            latency.add_metric([engine, MODEL], [*buckets, ("+Inf", 3.0)], 2.5)
        yield tokens
        yield latency


def _resource_families(fake: FakeVllm, engines: list[str]) -> Iterable[Metric]:
    """vLLM main: engine_sleep_resource_state (1 for each resource's state, 0 for the others),
    engine_fully_awake, and the frontend's sleep-mode operation histogram and in-flight gauge."""
    resources, awake = fake.resource_states()
    state = GaugeMetricFamily("vllm:engine_sleep_resource_state", "Engine sleep resource state.",
                              labels=["engine", "model_name", "resource", "state"])  # fmt: skip
    fully = GaugeMetricFamily("vllm:engine_fully_awake", "Engine fully awake.", labels=["engine", "model_name"])
    for engine in engines:
        for resource, states in RESOURCE_STATES.items():
            for name in states:
                state.add_metric([engine, MODEL, resource, name], float(resources[resource] == name))
        fully.add_metric([engine, MODEL], float(awake))
    duration = HistogramMetricFamily("vllm:rl_sleep_mode_operation_duration_seconds",
                                     "Duration of one sleep-mode operation.", labels=["operation"])  # fmt: skip
    flight = GaugeMetricFamily("vllm:rl_sleep_mode_operations_in_flight", "Sleep-mode operations currently awaited.",
                               labels=["operation"])  # fmt: skip
    timings, in_flight = fake.operation_timings()
    for operation, seconds in sorted(timings.items()):
        buckets = [(str(float(b)), float(sum(1 for s in seconds if s <= b))) for b in OPERATION_BUCKETS]
        duration.add_metric([operation], [*buckets, ("+Inf", float(len(seconds)))], sum(seconds))
    for operation, count in sorted(in_flight.items()):
        flight.add_metric([operation], float(count))
    yield from (state, fully, duration, flight)
