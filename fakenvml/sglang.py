"""A fake SGLang HTTP server: /server_info, /get_server_info and /health as real releases answer,
plus hostile behaviours, for tests and the demo. Binds loopback only and stops by itself.

Modes (the field names follow SGLang's history):
- "old":     only /get_server_info; memory_usage = {kvcache, token_capacity}
- "mid":     /server_info; {weight, kvcache, token_capacity, cuda_graph}
- "new":     /server_info; {weight, kvcache, token_capacity, graph: {phase: GB}, startup_available}
- "ancient": /get_server_info; internal_states without memory_usage
- hostile:   "hang", "slow", "status500", "garbage", "huge", "trickle", "trickle_headers", "shape",
             "deep" (JSON nested 5,000 levels)
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOSTILE = ("hang", "slow", "status500", "garbage", "huge", "trickle", "trickle_headers", "shape", "deep")


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


class _QuietServer(ThreadingHTTPServer):
    """Clients that give up on a hostile mode (hang, trickle) are expected, not worth a traceback."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass


class FakeSglang:
    def __init__(self, mode: str = "new", dp_size: int = 1, lifetime: float | None = 300.0) -> None:
        """`lifetime`: seconds until the server stops by itself (None: until stop(), for the demo)."""
        self.mode = mode
        self.dp_size = dp_size
        self.requests: list[str] = []
        self._stop = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                fake.requests.append(self.path)
                fake._respond(self)

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self._timer = threading.Timer(lifetime or 0, self.stop)
        self._timer.daemon = True
        if lifetime is not None:
            self._timer.start()

    def stop(self) -> None:
        self._stop.set()
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def _send(self, handler: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _respond(self, handler: BaseHTTPRequestHandler) -> None:
        mode, path = self.mode, handler.path
        if path == "/health":
            return self._send(handler, 200, b"")
        if path not in ("/server_info", "/get_server_info"):
            return self._send(handler, 404, b'{"detail":"Not Found"}')
        if mode in ("old", "ancient") and path == "/server_info":
            return self._send(handler, 404, b'{"detail":"Not Found"}')
        if mode == "hang":
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
            for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: " + b"x" * 200:
                if self._stop.wait(0.2):
                    return None
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
            return None
        if mode == "huge":
            return self._send(handler, 200, b'{"pad":"' + b"x" * (8 * 1024 * 1024) + b'"}')
        body = json.dumps(server_info("new" if mode in HOSTILE else mode, self.dp_size)).encode()
        if mode == "trickle":
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            for byte in body:
                if self._stop.wait(0.2):
                    return None
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
            return None
        return self._send(handler, 200, body)
