"""How every client in the project reaches a node's exporter: the gate's exporter source, the
crash-evidence call of wait_server_healthy and `gpu-residency-exporter exits`. One place
decides the base URL, the certificate check, the basic-auth header and the timeout, each
setting an argument else the environment, so no client silently ignores the exporter's TLS or
auth, and each answer is bounded in time and size.

    $GPU_RESIDENCY_EXPORTER_URL            base URL, http(s)://node:9852 (a trailing /metrics is dropped)
    $GPU_RESIDENCY_EXPORTER_CA_FILE        CA bundle for https (else the system's CAs; https is always verified)
    $GPU_RESIDENCY_EXPORTER_USER           basic auth user, with the password from
    $GPU_RESIDENCY_EXPORTER_PASSWORD_FILE  a file (less its final newline), else
    $GPU_RESIDENCY_EXPORTER_PASSWORD       the variable itself

Standard library only: the gate imports this when it builds its exporter source.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request

URL_ENV = "GPU_RESIDENCY_EXPORTER_URL"
CA_FILE_ENV = "GPU_RESIDENCY_EXPORTER_CA_FILE"
USER_ENV = "GPU_RESIDENCY_EXPORTER_USER"
PASSWORD_ENV = "GPU_RESIDENCY_EXPORTER_PASSWORD"
PASSWORD_FILE_ENV = "GPU_RESIDENCY_EXPORTER_PASSWORD_FILE"
TIMEOUT_S = 5.0  # to connect, and for each read of an answer (a long poll: after its own wait)
MAX_BODY = 16 * 1024**2


class ExporterError(Exception):
    """Settings that cannot work, or no usable answer; the message says which and never holds a
    secret. `status`: the HTTP status, where the exporter answered with one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ExporterClient:
    """GET JSON from one exporter, with its TLS and basic-auth settings."""

    def __init__(
        self,
        url: str | None = None,
        timeout: float = TIMEOUT_S,
        ca_file: str | None = None,
        username: str | None = None,
        password: str | None = None,
        password_file: str | None = None,
        fallback_url: str | None = None,
    ) -> None:
        """Each setting left out is read from the environment; `fallback_url` serves where neither
        `url` nor $GPU_RESIDENCY_EXPORTER_URL is given. ExporterError for settings that cannot work."""
        url = url or os.environ.get(URL_ENV) or fallback_url
        if not url:
            raise ExporterError(f"no exporter URL (give one, or set ${URL_ENV})")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ExporterError(f"{url!r} is not an http(s) base URL")
        self.url = url.rstrip("/").removesuffix("/metrics")
        if not timeout > 0:
            raise ExporterError(f"timeout={timeout!r} must be > 0")
        self.timeout = timeout
        if ca_file and parts.scheme != "https":
            raise ExporterError(f"a CA file was given for {url!r}, which is not https")
        handlers: list[urllib.request.BaseHandler] = []
        if parts.scheme == "https":
            ca_file = ca_file or os.environ.get(CA_FILE_ENV) or None
            try:
                handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca_file)))
            except (OSError, ssl.SSLError) as exc:
                raise ExporterError(f"cannot use CA file {ca_file}: {exc}") from None
        self._opener = urllib.request.build_opener(*handlers)
        self._headers = {"Accept": "application/json"}
        username = username if username is not None else os.environ.get(USER_ENV) or None
        if username:
            token = base64.b64encode(f"{username}:{_password(password, password_file)}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        elif password or password_file:
            raise ExporterError("a password was given without a user")

    def get_json(self, path: str, query: dict[str, str] | None = None, timeout: float | None = None) -> object:
        """GET `path` (`timeout`: per connect and read, default the client's); the parsed JSON, or
        ExporterError: refused, no answer in time, an HTTP error, too large, not JSON."""
        timeout = self.timeout if timeout is None else timeout
        where = self.url + path
        request = urllib.request.Request(where + ("?" + urllib.parse.urlencode(query) if query else ""))
        for name, value in self._headers.items():
            request.add_header(name, value)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                raw = response.read(MAX_BODY + 1)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise ExporterError(f"HTTP {exc.code} from {where}{_hint(exc.code)}", exc.code) from None
        except TimeoutError:
            raise ExporterError(f"no answer from {self.url} in {timeout:g}s") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                raise ExporterError(f"no answer from {self.url} in {timeout:g}s") from None
            raise ExporterError(f"cannot reach {self.url}: {reason}") from None
        except Exception as exc:  # http.client's own errors (a reply that is not HTTP, cut short)
            raise ExporterError(f"bad answer from {self.url}: {exc!r}") from None
        if len(raw) > MAX_BODY:
            raise ExporterError(f"{where} answered more than {MAX_BODY} bytes")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise ExporterError(f"{where} did not answer JSON") from None


def _password(password: str | None, password_file: str | None) -> str:
    """The argument, else the file (argument, then environment), else $GPU_RESIDENCY_EXPORTER_PASSWORD."""
    if password is not None:
        return password
    path = password_file or os.environ.get(PASSWORD_FILE_ENV)
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ExporterError(f"cannot read the password file {path}: {exc}") from None
    if PASSWORD_ENV in os.environ:
        return os.environ[PASSWORD_ENV]
    raise ExporterError(f"a user was given without a password (${PASSWORD_ENV} or a file)")


def _hint(code: int) -> str:
    if code == 401:
        return f": credentials missing or wrong (${USER_ENV}, ${PASSWORD_ENV} or ${PASSWORD_FILE_ENV})"
    if code == 404:
        return ": no such API (an exporter older than the JSON API, or not the exporter's URL)"
    if code == 429:
        return ": the exporter serves its maximum of waiters (--api.max-waiters)"
    return ""
