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
- "main" (vLLM's docs/design/engine_sleep_state.md at 13cbd441): as 0.33.0, plus
  `vllm:engine_sleep_resource_state{engine,model_name,resource,state}` (scheduler running|paused,
  weights resident|offloaded|discarded|unknown, kv_cache resident|released|unknown),
  `vllm:engine_fully_awake`, `vllm:rl_sleep_mode_operation_duration_seconds{operation}` and
  `vllm:rl_sleep_mode_operations_in_flight{operation}` (sleep, wake, release_kv_cache_memory);
  engine_sleep_state derived as vLLM derives it (awake only when fully awake); /wake_up answers
  {"status", "tags_woken"}. `op_seconds` makes each operation take that long; `fail_next` makes
  the next one fail (HTTP 500) and leave the resources it touched `unknown`.
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
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, generate_latest

from fakenvml.fake_http import FakeHttpServer
from fakenvml.vllm_metrics import BLOCKS_PER_ENGINE, MODEL, TOKENS_PER_ENGINE, Families

__all__ = ["BLOCKS_PER_ENGINE", "MODEL", "TOKENS_PER_ENGINE", "VERSIONS", "FakeVllm"]
VERSIONS = ("0.10.2", "0.11.1", "0.33.0", "main")
HOSTILE = ("hang", "slow", "status500", "garbage", "huge", "trickle", "trickle_headers", "shape",
           "bad_is_sleeping", "deep")  # fmt: skip
TAGS = ("weights", "kv_cache")
NOT_FOUND = b'{"detail":"Not Found"}'
AWAKE = {"scheduler": "running", "weights": "resident", "kv_cache": "resident"}


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
        self._resources = dict(AWAKE)  # "main": each resource's confirmed state
        self._timings: dict[str, list[float]] = {}  # "main": operation -> the seconds each call took
        self._in_flight = dict.fromkeys(("sleep", "wake", "release_kv_cache_memory"), 0)
        self.op_seconds = 0.0  # how long each sleep-mode operation takes ("main")
        self.fail_next = False  # the next operation fails and leaves what it touched unknown ("main")
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
            if self.version == "main":
                return self._resources != AWAKE
            return bool(self._asleep) or self._metric[0] == 1

    def sleep(self, level: int = 1) -> None:
        with self._lock:
            if self.version == "main":
                return self._set({"scheduler": "paused", **{0: {}, 1: dict(weights="offloaded", kv_cache="released"),
                                  2: dict(weights="discarded", kv_cache="released")}[level]})  # fmt: skip
            if self._asleep or self._metric[0]:
                return None  # "Executor is already sleeping."
            self._asleep = set(TAGS) if level in (1, 2) or self.version != "0.33.0" else set()
            self._metric = (1, level)
            return None

    def release_kv_cache(self) -> None:
        with self._lock:
            if self.version == "main":
                return self._set({"scheduler": "paused", "kv_cache": "released"})
            self._asleep.add("kv_cache")
            self._metric = (1, 0)
            return None

    def wake_up(self, tags: Iterable[str] | None = None) -> bool:
        """Wake the tags (all when None); True when the engine is fully awake after it."""
        with self._lock:
            if self.version == "main":
                self._set(dict.fromkeys(tags or TAGS, "resident"))
                if self._resources["weights"] == self._resources["kv_cache"] == "resident":
                    self._resources["scheduler"] = "running"
                return self._resources == AWAKE
            self._asleep -= set(tags or TAGS)
            awake = not self._asleep
            if awake or self.version != "0.33.0":
                self._metric = (0, 0)  # before 0.33 recorded on every wake, partial or not
            return awake

    def _set(self, states: dict[str, str]) -> None:
        """Apply a memory operation's outcome; a failed one leaves its memory resources unknown."""
        failed, self.fail_next = self.fail_next, False
        for resource, state in states.items():
            self._resources[resource] = "unknown" if failed and resource != "scheduler" else state
        if failed:
            raise RuntimeError("worker failed")

    def resource_states(self) -> tuple[dict[str, str], bool]:
        with self._lock:
            return dict(self._resources), self._resources == AWAKE

    def legacy_sleep_state(self) -> dict[str, int]:
        """engine_sleep_state's three flags: recorded levels before "main"; derived from the resources on it."""
        with self._lock:
            if self.version == "main":
                weights, kv = self._resources["weights"], self._resources["kv_cache"]
                return {"awake": int(self._resources == AWAKE), "weights_offloaded": int(weights == "offloaded"),
                        "discard_all": int(weights == "discarded" and kv == "released")}  # fmt: skip
            asleep, level = self._metric
            return {"awake": 1 - asleep, "weights_offloaded": int(asleep and level == 1),
                    "discard_all": int(asleep and level == 2)}  # fmt: skip

    def operation_timings(self) -> tuple[dict[str, list[float]], dict[str, int]]:
        with self._lock:
            return {op: list(seconds) for op, seconds in self._timings.items()}, dict(self._in_flight)

    def _timed(self, operation: str, call: Callable[[], object]) -> object:
        """`call()` as vLLM's frontend times it ("main"): in flight while it runs, observed when it ends."""
        started = time.monotonic()
        with self._lock:
            self._in_flight[operation] += 1
        try:
            time.sleep(self.op_seconds)
            return call()
        finally:
            with self._lock:
                self._in_flight[operation] -= 1
                self._timings.setdefault(operation, []).append(time.monotonic() - started)

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
        new = self.version in ("0.33.0", "main")
        if not self.dev_mode or parts.path not in ("/sleep", "/wake_up", "/release_kv_cache_memory"):
            return self._send(handler, 404, NOT_FOUND)
        if parts.path == "/release_kv_cache_memory" and not new:
            return self._send(handler, 404, NOT_FOUND)
        level = query.get("level", ["1"])[0]
        if parts.path == "/sleep" and (not level.isdigit() or (new and int(level) > 2)):
            return self._send(handler, 422, b'{"detail":"level"}')
        tags = query.get("tags") or None
        call, answer = {
            "/sleep": (lambda: self.sleep(int(level)), lambda _: {"status": "sleeping", "level": int(level)}),
            "/wake_up": (lambda: self.wake_up(tags),
                         lambda awake: {"status": "awake" if awake else "sleeping", self._woken_key(): tags}),
            "/release_kv_cache_memory": (self.release_kv_cache, lambda _: {"status": "kv_cache_released"}),
        }[parts.path]  # fmt: skip
        operation = {"/sleep": "sleep", "/wake_up": "wake"}.get(parts.path, "release_kv_cache_memory")
        try:
            result = self._timed(operation, call) if self.version == "main" else call()
        except RuntimeError as exc:
            return self._send(handler, 500, json.dumps({"error": str(exc)}).encode())
        return self._send(handler, 200, json.dumps(answer(result)).encode() if new else b"")

    def _woken_key(self) -> str:
        return "tags_woken" if self.version == "main" else "tags"

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
        registry.register(Families(self))
        body = generate_latest(registry)
        if mode == "trickle":
            return self._trickle_body(handler, body)
        return self._send(handler, 200, body, "text/plain; version=0.0.4; charset=utf-8")
