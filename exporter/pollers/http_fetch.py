"""One bounded HTTP GET to an engine: a hard deadline on the whole exchange and a size cap.

Socket timeouts bound each read, not the exchange: an engine that trickles its headers or
body a byte a second never trips them. Here a timer shuts the socket down at the deadline,
so whatever the peer does, the call returns by then. No proxies from the environment, no
redirects, no connection reuse (engines are polled every few seconds at most).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


class FetchError(Exception):
    """The request failed; `reason` is the error counter's label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason  # timeout | unreachable | too_large | status


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str


def _abort(sockets: list[socket.socket], expired: threading.Event) -> None:
    expired.set()
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def fetch(url: str, deadline: float, connect_timeout: float = 1.0, max_bytes: int = 1024 * 1024) -> Response:
    """GET `url`; FetchError when it fails, takes longer than `deadline` seconds or exceeds `max_bytes`."""
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=connect_timeout, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=connect_timeout)
    expired = threading.Event()
    sockets: list[socket.socket] = []  # the response keeps reading it after the connection lets go of it
    timer = threading.Timer(deadline, _abort, args=(sockets, expired))
    timer.daemon = True
    started = time.monotonic()
    timer.start()
    try:
        conn.connect()
        sockets.append(conn.sock)
        if expired.is_set():  # the deadline passed while connecting (the timer found no socket)
            raise FetchError("timeout", f"{url}: not complete in {deadline:g}s")
        conn.sock.settimeout(max(0.01, deadline - (time.monotonic() - started)))
        conn.request("GET", path, headers={"Accept": "application/json, text/plain", "Connection": "close"})
        response = conn.getresponse()
        chunks, size = [], 0
        while chunk := response.read1(65536):
            size += len(chunk)
            if size > max_bytes:
                raise FetchError("too_large", f"{url}: body over {max_bytes} bytes")
            chunks.append(chunk)
        if expired.is_set():
            raise FetchError("timeout", f"{url}: not complete in {deadline:g}s")
        return Response(response.status, b"".join(chunks), response.getheader("Content-Type") or "")
    except FetchError:
        raise
    except TimeoutError:
        raise FetchError("timeout", f"{url}: timed out") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if expired.is_set():
            raise FetchError("timeout", f"{url}: not complete in {deadline:g}s") from None
        raise FetchError("unreachable", f"{url}: {type(exc).__name__}: {exc}") from None
    finally:
        timer.cancel()
        conn.close()
