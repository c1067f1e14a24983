"""The HTTP side: metrics at the telemetry path, /healthz, and a landing page at /."""

from __future__ import annotations

import html
import logging
import socket
import ssl
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from exporter import __version__
from exporter.web_config import WebConfig, unauthorized_app

log = logging.getLogger(__name__)


class ListenAddressError(ValueError):
    """A --web.listen-address that is not host:port."""


def parse_listen_address(value: str) -> tuple[str, int]:
    """'host:port', ':port' (all interfaces) or '[v6]:port' -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ListenAddressError(f"--web.listen-address {value!r}: expected host:port, e.g. :9852 or 127.0.0.1:9852")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def server_bind(self) -> None:
        if ":" in self.server_address[0]:
            self.address_family = socket.AF_INET6
            self.socket = socket.socket(self.address_family, self.socket_type)
        super().server_bind()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, fmt: str, *args: object) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)


def make_app(registry: CollectorRegistry, telemetry_path: str, web: WebConfig | None = None, healthy=lambda: True):
    """WSGI app: telemetry path -> metrics, /healthz -> 200 'ok', / -> landing page.

    With basic auth users configured, everything but /healthz needs credentials."""
    web = web or WebConfig()
    metrics = make_wsgi_app(registry)
    landing = (
        "<html><head><title>gpu-residency exporter</title></head><body>"
        f"<h1>gpu-residency exporter {html.escape(__version__)}</h1>"
        f'<p><a href="{html.escape(telemetry_path)}">Metrics</a> &middot; <a href="/healthz">Health</a></p>'
        "</body></html>"
    ).encode()

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path != "/healthz" and not web.authorized(environ.get("HTTP_AUTHORIZATION")):
            return unauthorized_app(environ, start_response)
        if path == telemetry_path:
            return metrics(environ, start_response)
        if path == "/healthz":
            ok = healthy()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"unhealthy\n"]
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [landing]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app


class ExporterServer:
    """A threaded HTTP server on its own thread; `address` is the bound (host, port)."""

    def __init__(self, app, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self._httpd = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
        if tls is not None:
            # The handshake happens in the request's own thread, so a slow client cannot stall accept().
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.address = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
