"""A fake vLLM OpenAI server's sleep-mode routes and /metrics, as real releases answer them, plus
hostile behaviours, for tests and the demo. Binds loopback by default and stops by itself.

Releases (`version`; the names and shapes are vLLM's own, see the notes in exporter/pollers/vllm.py):
- "0.10.2": no sleep state on /metrics; `GET /is_sleeping` -> {"is_sleeping": bool}; KV usage as
  `vllm:kv_cache_usage_perc` and the deprecated `vllm:gpu_cache_usage_perc`; `vllm:cache_config_info`
  without `kv_cache_size_tokens`. `POST /sleep?level=1|2` and `POST /wake_up[?tags=weights&tags=kv_cache]`
  answer 200 with an empty body.
- "0.11.1": `vllm:engine_sleep_state{engine,model_name,sleep_state}` (awake, weights_offloaded,
  discard_all); any /wake_up, even a partial one, sets awake=1 (as 0.11.1 and 0.12 do) while
  /is_sleeping stays true until every tag is awake; no `vllm:gpu_cache_usage_perc`.
- "0.33.0": /sleep takes level 0..2 (0: scheduling paused, memory kept; all three sleep states 0)
  and answers {"status": "sleeping", "level": N}; /wake_up answers {"status": "awake"|"sleeping",
  "tags": [...]} and the metric says awake only once every tag is; `POST /release_kv_cache_memory`;
  `kv_cache_size_tokens` and `kv_cache_max_concurrency` in `vllm:cache_config_info`; with data
  parallelism `num_gpu_blocks` is the sum over the engines.
The dev routes (/sleep, /wake_up, /is_sleeping, /release_kv_cache_memory) exist only with
`dev_mode` (vLLM: VLLM_SERVER_DEV_MODE=1); /metrics and /health always.

Hostile modes (`mode`): "hang", "slow", "status500", "garbage", "huge" (8 MiB), "trickle",
"trickle_headers" on /metrics; "shape" (a sleep state of 2); "bad_is_sleeping" (garbage) and "deep"
(JSON nested 5,000 levels) on /is_sleeping of a 0.10.2 server.

As a process (`vllm serve`): fakenvml/vllm_serve.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from fakenvml.fake_http import FakeHttpServer

VERSIONS = ("0.10.2", "0.11.1", "0.33.0")
HOSTILE = ("hang", "slow", "status500", "garbage", "huge", "trickle", "trickle_headers", "shape",
           "bad_is_sleeping", "deep")  # fmt: skip
MODEL = "Qwen/Qwen3-8B"
TAGS = ("weights", "kv_cache")
NOT_FOUND = b'{"detail":"Not Found"}'
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


class FakeVllm(FakeHttpServer):
    def __init__(
        self,
        version: str = "0.11.1",
        mode: str = "ok",
        dp_size: int = 1,
        dev_mode: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        lifetime: float | None = 300.0,
    ) -> None:
        """`lifetime`: seconds until the server stops by itself (None: until stop())."""
        if version not in VERSIONS:
            raise ValueError(f"version {version!r} must be one of {VERSIONS}")
        self.version = version
        self.mode = mode
        self.dp_size = dp_size
        self.dev_mode = dev_mode
        self.requests: list[str] = []  # "GET /metrics", "POST /sleep?level=1", ...
        self.kv_usage = 0.25
        self._lock = threading.Lock()
        self._asleep: set[str] = set()  # the tags asleep (the executor's sleeping_tags)
        self._metric = (0, 0)  # what record_sleep_state last recorded: (sleep, level)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                fake.requests.append(f"GET {self.path}")
                fake._get(self)

            def do_POST(self) -> None:
                fake.requests.append(f"POST {self.path}")
                fake._post(self)

        super().__init__(Handler, host, port, lifetime)

    # --- the engine, as AsyncLLM and the executor keep it ---

    @property
    def is_sleeping(self) -> bool:
        with self._lock:
            return bool(self._asleep) or self._metric[0] == 1

    def sleep(self, level: int = 1) -> None:
        with self._lock:
            if self._asleep or self._metric[0]:
                return  # "Executor is already sleeping."
            self._asleep = set(TAGS) if level in (1, 2) or self.version != "0.33.0" else set()
            self._metric = (1, level)

    def release_kv_cache(self) -> None:
        with self._lock:
            self._asleep.add("kv_cache")
            self._metric = (1, 0)

    def wake_up(self, tags: Iterable[str] | None = None) -> bool:
        """Wake the tags (all when None); True when the engine is fully awake after it."""
        with self._lock:
            self._asleep -= set(tags or TAGS)
            awake = not self._asleep
            if awake or self.version != "0.33.0":
                self._metric = (0, 0)  # before 0.33 recorded on every wake, partial or not
            return awake

    # --- HTTP ---

    def _get(self, handler: BaseHTTPRequestHandler) -> None:
        path = urlsplit(handler.path).path
        if path == "/health":
            return self._send(handler, 200, b"")
        if path == "/metrics":
            return self._metrics(handler)
        if path == "/is_sleeping" and self.dev_mode:
            if self.mode == "bad_is_sleeping":
                return self._send(handler, 200, b"<html>sleeping?\x00")
            if self.mode == "deep":
                return self._send(handler, 200, b'{"is_sleeping": ' + b"[" * 5000 + b"]" * 5000 + b"}")
            return self._send(handler, 200, json.dumps({"is_sleeping": self.is_sleeping}).encode())
        return self._send(handler, 404, NOT_FOUND)

    def _post(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        query = parse_qs(parts.query)
        new = self.version == "0.33.0"
        if not self.dev_mode or parts.path not in ("/sleep", "/wake_up", "/release_kv_cache_memory"):
            return self._send(handler, 404, NOT_FOUND)
        if parts.path == "/sleep":
            level = query.get("level", ["1"])[0]
            if not level.isdigit() or (new and int(level) > 2):
                return self._send(handler, 422, b'{"detail":"level"}')
            self.sleep(int(level))
            body = json.dumps({"status": "sleeping", "level": int(level)}).encode() if new else b""
            return self._send(handler, 200, body)
        if parts.path == "/wake_up":
            tags = query.get("tags") or None
            awake = self.wake_up(tags)
            body = json.dumps({"status": "awake" if awake else "sleeping", "tags": tags}).encode() if new else b""
            return self._send(handler, 200, body)
        if not new:
            return self._send(handler, 404, NOT_FOUND)
        self.release_kv_cache()
        return self._send(handler, 200, b'{"status":"kv_cache_released"}')

    def _metrics(self, handler: BaseHTTPRequestHandler) -> None:
        mode = self.mode
        if mode == "hang":
            self._stop.wait(30)
            return None
        if mode == "slow":
            time.sleep(0.5)
        if mode == "status500":
            return self._send(handler, 500, b"Internal Server Error", "text/plain")
        if mode == "garbage":
            return self._send(handler, 200, b"<html>not metrics\x00\xff {{{ }", "text/plain")
        if mode == "huge":
            line = b'vllm:pad{engine="0"} 1.0\n'
            return self._send(handler, 200, line * (8 * 1024 * 1024 // len(line) + 1), "text/plain")
        if mode == "trickle_headers":
            return self._trickle_headers(handler, "text/plain")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(self))
        body = generate_latest(registry)
        if mode == "trickle":
            return self._trickle_body(handler, body)
        return self._send(handler, 200, body, "text/plain; version=0.0.4; charset=utf-8")


class _Families:
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
            asleep, level = fake._metric
            values = {"awake": 1 - asleep, "weights_offloaded": int(asleep and level == 1),
                      "discard_all": int(asleep and level == 2)}  # fmt: skip
            if fake.mode == "shape":
                values["awake"] = 2
            for engine in engines:
                for state, value in values.items():
                    sleep.add_metric([engine, MODEL, state], float(value))
            yield sleep
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
        blocks = BLOCKS_PER_ENGINE * (fake.dp_size if fake.version == "0.33.0" else 1)
        labels["num_gpu_blocks"] = str(blocks)
        if fake.version == "0.33.0":
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
