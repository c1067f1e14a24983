"""A fake SGLang HTTP server: /server_info, /get_server_info, /health, /health_generate and
/flush_cache as real releases answer, plus hostile behaviours, for tests and the demo. Binds
loopback only and stops by itself.

Modes (the field names follow SGLang's history):
- "old":     only /get_server_info; memory_usage = {kvcache, token_capacity}
- "mid":     /server_info; {weight, kvcache, token_capacity, cuda_graph}
- "new":     /server_info; {weight, kvcache, token_capacity, graph: {phase: GB}, startup_available}
- "ancient": /get_server_info; internal_states without memory_usage
- hostile:   "hang", "slow", "status500", "garbage", "huge", "trickle", "trickle_headers", "shape",
             "deep" (JSON nested 5,000 levels)
- /metrics (newer releases, --enable-metrics): "new" serves the same accounting as gauges
  (`sglang:weight_memory_usage_gb`, `sglang:kv_cache_memory_usage_gb`, `sglang:graph_memory_usage_gb{phase}`,
  `sglang:startup_available_gpu_memory_gb`, `sglang:max_total_num_tokens`), one series per scheduler
  (`tp_size` per DP rank); "metrics_only" serves only those (no /server_info, no /get_server_info);
  "slow_info" never answers /server_info (as "hang"); "mid" and "old" serve /metrics without them.

Start-up, as a framework waiting for the engine sees it: /health answers 200 at once (the
HTTP server is up), /health_generate answers 503 until `health_after` seconds have passed
(the model is loading), then 200. /flush_cache (`flush`): "ok" answers 200; "die" kills the
process serving it with SIGKILL mid-request, as an engine dying there does (run the server
in its own process: `serve`, or `python -m fakenvml.sglang`); "hang" never answers. With
`api_key`, every route but /health answers 401 to a request without `Bearer <api_key>`.
GET /_fake/requests lists the requests so far as [path, Authorization header] pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from fakenvml.fake_http import FakeHttpServer

HOSTILE = ("hang", "slow", "status500", "garbage", "huge", "trickle", "trickle_headers", "shape", "deep")
METRICS_MODES = ("new", "metrics_only", "slow_info")  # whose /metrics carries the memory gauges
FLUSH_MODES = ("ok", "die", "hang")
GAUGES = ("sglang:weight_memory_usage_gb", "sglang:kv_cache_memory_usage_gb", "sglang:graph_memory_usage_gb",
          "sglang:startup_available_gpu_memory_gb", "sglang:max_total_num_tokens")  # fmt: skip


def server_info(mode: str, dp_size: int) -> dict:
    """A body shaped like the given SGLang generation, one internal state per DP rank."""
    states = []
    for rank in range(dp_size):
        usage: dict = {"kvcache": 55.25 + rank, "token_capacity": 901_234 + rank}
        if mode in ("mid", "new"):
            usage["weight"] = 14.5
        if mode == "mid":
            usage["cuda_graph"] = 1.25
        if mode == "new":
            usage["graph"] = {"decode": 0.75, "prefill": 0.5}
            usage["startup_available"] = 70.0
            usage["token_capacity_swa"] = None
        state = {"last_gen_throughput": 0.0, "memory_usage": usage}
        if mode == "ancient":
            del state["memory_usage"]
        states.append(state)
    return {"model_path": "/models/demo", "tp_size": 1, "dp_size": dp_size, "internal_states": states, "version": "x"}


def metrics(mode: str, dp_size: int, tp_size: int) -> bytes:
    """A /metrics body: the memory gauges of every scheduler (as server_info("new") per DP rank) in
    the modes that have them, else only a request gauge, as releases before them."""
    labels = ["model_name", "engine_type", "tp_rank", "pp_rank", "moe_ep_rank"] + (["dp_rank"] if dp_size > 1 else [])
    families = {
        name: GaugeMetricFamily(name, name, labels=labels + (["phase"] if "graph" in name else []))
        for name in ("sglang:num_running_reqs",) + (GAUGES if mode in METRICS_MODES else ())
    }
    for rank in range(dp_size):
        usage = server_info("new", dp_size)["internal_states"][rank]["memory_usage"]
        values = {"sglang:num_running_reqs": 0.0, "sglang:weight_memory_usage_gb": usage["weight"],
                  "sglang:kv_cache_memory_usage_gb": usage["kvcache"],
                  "sglang:startup_available_gpu_memory_gb": usage["startup_available"],
                  "sglang:max_total_num_tokens": usage["token_capacity"]}  # fmt: skip
        for tp in range(tp_size):
            common = ["/models/demo", "unified", str(tp), "0", "0"] + ([str(rank)] if dp_size > 1 else [])
            for name, family in families.items():
                if name == "sglang:graph_memory_usage_gb":
                    for phase, gb in usage["graph"].items():
                        family.add_metric([*common, phase], gb)
                else:
                    family.add_metric(common, values[name])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self) -> list:
        return self.families


class FakeSglang(FakeHttpServer):
    def __init__(
        self,
        mode: str = "new",
        dp_size: int = 1,
        lifetime: float | None = 300.0,
        health_after: float = 0.0,
        flush: str = "ok",
        api_key: str | None = None,
        tp_size: int = 1,
    ) -> None:
        """`lifetime`: seconds until the server stops by itself (None: until stop(), for the demo)."""
        if flush not in FLUSH_MODES:
            raise ValueError(f"flush {flush!r} must be one of {FLUSH_MODES}")
        self.mode = mode
        self.dp_size = dp_size
        self.tp_size = tp_size
        self.health_after = health_after
        self.flush = flush
        self.api_key = api_key
        self.requests: list[str] = []
        self.authorizations: list[str | None] = []  # the Authorization header of each request
        self._started = time.monotonic()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/_fake/requests":
                    body = json.dumps(list(zip(fake.requests, fake.authorizations, strict=True))).encode()
                    return fake._send(self, 200, body)
                fake.requests.append(self.path)
                fake.authorizations.append(self.headers.get("Authorization"))
                fake._respond(self)
                return None

        super().__init__(Handler, "127.0.0.1", 0, lifetime)

    def _respond(self, handler: BaseHTTPRequestHandler) -> None:
        mode, path = self.mode, handler.path
        if path == "/health":
            return self._send(handler, 200, b"")
        if self.api_key is not None and handler.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._send(handler, 401, b'{"error":"Unauthorized"}')
        if path == "/health_generate":
            loading = time.monotonic() - self._started < self.health_after
            return self._send(handler, 503 if loading else 200, b"")
        if path == "/flush_cache":
            return self._flush(handler)
        if path == "/metrics":
            return self._send(handler, 200, metrics(mode, self.dp_size, self.tp_size), "text/plain; version=0.0.4")
        if path not in ("/server_info", "/get_server_info") or mode == "metrics_only":
            return self._send(handler, 404, b'{"detail":"Not Found"}')
        if mode in ("old", "ancient") and path == "/server_info":
            return self._send(handler, 404, b'{"detail":"Not Found"}')
        if mode in ("hang", "slow_info"):
            self._stop.wait(30)
            return None
        if mode == "slow":
            time.sleep(0.5)
        if mode == "status500":
            return self._send(handler, 500, b'{"error":"internal"}')
        if mode == "garbage":
            return self._send(handler, 200, b"<html>not json\x00\xff")
        if mode == "shape":
            return self._send(handler, 200, b'{"internal_states": "yes"}')
        if mode == "deep":
            return self._send(handler, 200, b'{"internal_states": ' + b"[" * 5000 + b"]" * 5000 + b"}")
        if mode == "trickle_headers":
            return self._trickle_headers(handler, "application/json")
        if mode == "huge":
            return self._send(handler, 200, b'{"pad":"' + b"x" * (8 * 1024 * 1024) + b'"}')
        shape = "new" if mode in HOSTILE or mode in METRICS_MODES else mode
        body = json.dumps(server_info(shape, self.dp_size)).encode()
        if mode == "trickle":
            return self._trickle_body(handler, body)
        return self._send(handler, 200, body)

    def _flush(self, handler: BaseHTTPRequestHandler) -> None:
        if self.flush == "die":
            os.kill(os.getpid(), signal.SIGKILL)  # the whole engine process, mid-request
        if self.flush == "hang":
            self._stop.wait(3600)
            return None
        return self._send(handler, 200, b"Cache flushed.\nPlease check backend logs for more details.\n")


def serve(urls, lifetime: float = 120.0, **options) -> None:
    """Run a FakeSglang in this process (a multiprocessing target): put its URL on `urls`, then
    serve until `lifetime` has passed. `options` as FakeSglang's."""
    server = FakeSglang(lifetime=None, **options)
    urls.put(server.url)
    time.sleep(lifetime)
    server.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m fakenvml.sglang [--flush die]`: an engine process; prints its URL, serves until --lifetime."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="new")
    parser.add_argument("--health-after", type=float, default=0.0)
    parser.add_argument("--flush", choices=FLUSH_MODES, default="ok")
    parser.add_argument("--api-key")
    parser.add_argument("--lifetime", type=float, default=120.0)
    args = parser.parse_args(argv)

    class Printer:
        def put(self, url: str) -> None:
            print(url, flush=True)

    serve(Printer(), args.lifetime, mode=args.mode, health_after=args.health_after, flush=args.flush,
          api_key=args.api_key)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
