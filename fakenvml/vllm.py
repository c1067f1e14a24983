"""A fake vLLM OpenAI server's sleep-mode routes and /metrics, as real releases answer them, plus
hostile behaviours, for tests and the demo. Binds loopback by default and stops by itself.

Releases (`version`; the names and shapes are vLLM's own, see the notes in exporter/vllm.py):
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

As a process it stands in for `vllm serve`: `python -m fakenvml.vllm serve MODEL --port P
[--tensor-parallel-size N]` serves on P and starts its engine's process tree as vLLM does
(`VLLM::EngineCore`, which holds the GPU memory at TP=1, or its `VLLM::Worker_TP<i>` children),
prints its URL, then one line per GPU-holding process: its PID. It exits when the process that
started it goes away. `console_script(dir)` writes a
`vllm` script, so the command line is `<python> <dir>/vllm serve ...` like a real install's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from fakenvml.fake_http import FakeHttpServer, stop_process
from fakenvml.interpreter import shebang_python

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


# ---------- the fake as a `vllm serve` process ----------


def console_script(directory: Path) -> Path:
    """A `vllm` console script running this fake, as pip installs vLLM's (a Python shebang)."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "vllm"
    script.write_text(f"#!{shebang_python()}\nimport sys\nfrom fakenvml.vllm import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return script


@dataclass
class VllmProcess:
    """A started fake `vllm serve`: the process, its URL and the PIDs that hold GPU memory."""

    proc: subprocess.Popen
    url: str
    workers: list[int]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)


def launch(args: list[str], script: Path | None = None, dev_mode: bool = True, timeout: float = 30.0) -> VllmProcess:
    """Start `vllm serve ARGS` (through `script`, else `python -m fakenvml.vllm`) and wait for its URL and PIDs."""
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1" if dev_mode else "0")
    package_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    # The script is executed itself: the kernel runs its shebang's interpreter, argv [python, script, ...], comm "vllm".
    command = [str(script)] if script else [sys.executable, "-m", "fakenvml.vllm"]
    proc = subprocess.Popen([*command, "serve", *args], stdout=subprocess.PIPE, text=True, env=env)
    ready = threading.Event()
    lines: list[str] = []

    def read() -> None:
        lines.append(proc.stdout.readline().strip())
        count = int(lines[0].split()[1]) if lines[0] else 0
        lines.extend(proc.stdout.readline().strip() for _ in range(count))
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout) or not lines[0]:
        proc.kill()
        raise RuntimeError(f"fake vllm serve did not start: {lines}")
    return VllmProcess(proc, lines[0].split()[0], [int(line) for line in lines[1:]])


def _rank_of(pid: int) -> int:
    """The rank in a worker's title (VLLM::Worker_TP1 -> 1), which it set before printing its PID."""
    title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()
    digits = title[len(title.rstrip("0123456789")) :]
    return int(digits) if digits else 0


def main(argv: list[str] | None = None) -> int:
    """`vllm serve [MODEL] [--host H] [--port P] [--tensor-parallel-size N]`, fake: prints '<url> <n>' then n PIDs."""
    from fakenvml.tree import start as start_tree

    parser = argparse.ArgumentParser(
        prog="vllm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model", nargs="?", default=MODEL)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    parser.add_argument("--enable-sleep-mode", action="store_true")
    parser.add_argument("--fake-version", choices=VERSIONS, default="0.11.1")
    parser.add_argument("--fake-mode", default="ok")
    parser.add_argument("--fake-lifetime", type=float, default=300.0)
    args = parser.parse_args(argv)
    dev_mode = os.environ.get("VLLM_SERVER_DEV_MODE", "0") == "1"
    host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host  # the fake stays on loopback
    server = FakeVllm(args.fake_version, args.fake_mode, args.data_parallel_size, dev_mode, host, args.port, None)
    tp = args.tensor_parallel_size
    if tp > 1:  # the engine core's workers hold the memory
        tree = start_tree(tp, depth=1, title="VLLM::Worker_TP{rank}", max_seconds=args.fake_lifetime,
                          parent_title="VLLM::EngineCore")  # fmt: skip
    else:  # the model runs inside the engine core
        tree = start_tree(1, depth=0, title="VLLM::EngineCore", max_seconds=args.fake_lifetime)
    print(f"{server.url} {len(tree.leaves)}", flush=True)
    for pid in sorted(tree.leaves, key=_rank_of):  # leaves print in any order; ranks in order here
        print(pid, flush=True)
    # A plain flag: Event.set() from a signal handler can deadlock against Event.wait().
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    deadline, parent = time.monotonic() + args.fake_lifetime, os.getppid()
    while not stopping and time.monotonic() < deadline and os.getppid() == parent:  # never outlives its starter
        time.sleep(0.2)
    tree.stop()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
