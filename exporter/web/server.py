"""The HTTP side: metrics at the telemetry path, /healthz, and a landing page at /."""

from __future__ import annotations

import contextlib
import gzip
import html
import json
import logging
import select
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import gzip_accepted

from exporter import __version__
from exporter.web.config import WebConfig
from exporter.web.exposition import CONTENT_TYPE, Exposition
from exporter.web.log_limit import LogLimiter

log = logging.getLogger(__name__)
REFUSED_LOG_INTERVAL_S = 60.0  # refused credentials or connections: one log line a minute at most, with the count
DEFAULT_MAX_CONNECTIONS = 128
SHUTDOWN_WAIT_SECONDS = 5.0


class ListenAddressError(ValueError):
    """A --web.listen-address that is not host:port."""


def parse_listen_address(value: str) -> tuple[str, int]:
    """'host:port', ':port' (all interfaces) or '[v6]:port' -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ListenAddressError(f"--web.listen-address {value!r}: expected host:port, e.g. :9852 or 127.0.0.1:9852")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], respond: Responder, web: WebConfig, max_connections: int) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.respond = respond
        self.web = web
        self._max_connections = max_connections
        self._places = threading.BoundedSemaphore(max_connections)
        self._refused = LogLimiter(log, REFUSED_LOG_INTERVAL_S)
        super().__init__(address, _Handler)

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        """A thread per connection, at most max_connections at once: beyond, the connection is
        closed unanswered, so no number of idle or slow clients can exhaust the process."""
        if not self._places.acquire(blocking=False):
            self._refused.warning(
                f"closed a connection from {client_address[0]}: {self._max_connections} open already "
                "(--web.max-connections)"
            )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: its place is free again
            self._places.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: tuple) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._places.release()

    def handle_error(self, request: object, client_address: tuple) -> None:
        """A client that fails its TLS handshake or drops the connection is not the exporter's
        error: one debug line, not socketserver's traceback on stderr."""
        log.debug("connection from %s ended in error", client_address[0], exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive: Prometheus reuses its connection, so a scrape costs no new
    # connection and no new thread. Idle connections are closed after `timeout` seconds.
    protocol_version = "HTTP/1.1"
    timeout = 30
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

    def do_GET(self) -> None:
        web: WebConfig = self.server.web
        try:
            parts = urlsplit(self.path)
            request = Request(parts.path, parse_qs(parts.query), self.headers, self.connection, self.client_address[0])
            status, headers, body = self.server.respond(request)
        except Exception:
            # Never an empty reply: a scraper must see that this scrape failed, and why is logged.
            log.exception("internal error answering %s", urlsplit(self.path).path)
            status, headers, body = 500, [("Content-Type", "text/plain; charset=utf-8")], b"internal error\n"
        self.send_response(status)
        for name, value in [*headers, *web.headers]:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: object) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)


@dataclass(frozen=True)
class Request:
    path: str
    query: dict[str, list[str]]
    headers: Message
    connection: socket.socket | None = None  # a long poll watches it: a client that left ends the wait
    client: str = ""  # the peer's address, for the log


Response = tuple[int, list[tuple[str, str]], bytes]
Responder = Callable[[Request], Response]
Route = Callable[[Request], Response]  # an API path's handler; runs on the connection's own thread


def json_response(status: int, body: object) -> Response:
    """An API answer: JSON, never cached."""
    return (
        status,
        [("Content-Type", "application/json"), ("Cache-Control", "no-store")],
        (json.dumps(body, separators=(",", ":")) + "\n").encode(),
    )


def client_gone(connection: socket.socket | None) -> bool:
    """The client closed or reset its connection (POLLRDHUP: it is gone even with TLS, where a
    peek would see the close_notify record as data)."""
    if connection is None:
        return False
    try:
        fd = connection.fileno()
    except OSError:
        return True
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, getattr(select, "POLLRDHUP", 0x2000) | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


def make_responder(
    registry: CollectorRegistry,
    telemetry_path: str,
    web: WebConfig | None = None,
    routes: dict[str, Route] | None = None,
    auth_log_interval: float = REFUSED_LOG_INTERVAL_S,
) -> Responder:
    """request -> (status, headers, body): the telemetry path -> metrics, /healthz -> 'ok', / -> landing page,
    and each of `routes` (the JSON API) to its handler.

    With basic auth users configured, everything but /healthz needs credentials; any refusal is a
    401, logged at most once per `auth_log_interval` seconds (any client can cause it)."""
    routes = dict(routes or {})
    web = web or WebConfig()
    refused = LogLimiter(log, auth_log_interval)
    landing = (
        "<html><head><title>gpu-residency exporter</title></head><body>"
        f"<h1>gpu-residency exporter {html.escape(__version__)}</h1>"
        f'<p><a href="{html.escape(telemetry_path)}">Metrics</a> &middot; <a href="/healthz">Health</a></p>'
        "</body></html>"
    ).encode()
    text = [("Content-Type", "text/plain; charset=utf-8")]
    exposition = Exposition()

    def respond(request: Request) -> Response:
        path, headers = request.path, request.headers
        if web.allowed_sans:
            connection = request.connection
            if not web.client_allowed(connection.getpeercert() if isinstance(connection, ssl.SSLSocket) else None):
                # client_allowed_sans: a verified certificate that names none of them is refused.
                refused.warning(f"refused a request from {request.client or 'a client'}: its certificate names "
                                "none of client_allowed_sans")  # fmt: skip
                return 403, text, b"client certificate not allowed\n"
        if path == "/healthz":
            return 200, text, b"ok\n"  # the process serves: that is what liveness means here
        why = web.refusal(headers.get("Authorization"))
        if why is not None:
            refused.warning(f"refused a request from {request.client or 'a client'} for {path[:100]!r}: {why}")
            return 401, [*text, ("WWW-Authenticate", 'Basic realm="gpu-residency"')], b"unauthorized\n"
        if path == telemetry_path:
            body = exposition.render(registry.collect())
            if gzip_accepted(headers.get("Accept-Encoding") or ""):
                return (
                    200,
                    [("Content-Type", CONTENT_TYPE), ("Content-Encoding", "gzip")],
                    gzip.compress(body, 1),
                )  # level 1: a fraction of the CPU, most of the size
            return 200, [("Content-Type", CONTENT_TYPE)], body
        if path == "/":
            return 200, [("Content-Type", "text/html; charset=utf-8")], landing
        if path in routes:
            return routes[path](request)
        return 404, text, b"not found\n"

    return respond


class ExporterServer:
    """A threaded HTTP server on its own thread; `address` is the bound (host, port)."""

    def __init__(
        self,
        respond: Responder,
        host: str,
        port: int,
        web: WebConfig | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        web = web or WebConfig()
        self._httpd = _Server((host, port), respond, web, max_connections)
        if web.tls is not None:
            # The handshake happens in the connection's own thread, so a slow client cannot stall accept().
            self._httpd.socket = web.tls.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self.address = self._httpd.server_address[:2]
        # Asleep in select() until a connection comes (socketserver's default wakes every 0.5 s to look
        # for a shutdown: an idle exporter's largest single cost); stop() wakes it with a connection.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(None,), name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        stopping = threading.Thread(target=self._httpd.shutdown, name="http-stop", daemon=True)
        stopping.start()
        if self._thread.is_alive():
            with contextlib.suppress(OSError), socket.create_connection(self.address[:2], timeout=1.0):
                pass
        stopping.join(SHUTDOWN_WAIT_SECONDS)
        self._httpd.server_close()
