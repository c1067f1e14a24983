"""What the fake engines (fakenvml.sglang, fakenvml.vllm) share: a server in a daemon thread that
stops by itself, the answers every hostile mode needs, and stopping a child process for good."""

from __future__ import annotations

import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietServer(ThreadingHTTPServer):
    """Clients that give up on a hostile mode (hang, trickle) are expected, not worth a traceback."""

    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass


class FakeHttpServer:
    """Serves `handler` on `host` in a daemon thread; stops after `lifetime` seconds (None: at stop())."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str, port: int, lifetime: float | None) -> None:
        self._stop = threading.Event()
        self._server = QuietServer((host, port), handler)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self._server.server_address[1]}"
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

    def _send(self, handler: BaseHTTPRequestHandler, status: int, body: bytes, kind: str = "application/json") -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _trickle(self, handler: BaseHTTPRequestHandler, data: bytes) -> None:
        """`data` a byte every 0.2 s, until it is all sent, the server stops or the client leaves."""
        for byte in data:
            if self._stop.wait(0.2):
                return
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()

    def _trickle_headers(self, handler: BaseHTTPRequestHandler, kind: str) -> None:
        """A status line and headers that never end: the client's deadline must end the exchange."""
        self._trickle(handler, f"HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nX-Slow: ".encode() + b"x" * 200)

    def _trickle_body(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        self._trickle(handler, body)


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after `grace` seconds: a child of a test or a benchmark never outlives it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode
