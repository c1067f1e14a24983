"""The exporter source: the node's gpu-residency exporter answers with a fresh NVML reading, over
HTTP(S), without Prometheus' scrape interval in between.

    GET /api/v1/gpus                                        every GPU, with its holders
    GET /api/v1/wait?gpus=0,GPU-…&threshold_bytes=N&timeout=S
                                                            answered as soon as every named GPU is
                                                            under N, or at S with the last reading

Standard library only (urllib), imported when the source is built. Every failure (refused,
no answer in time, HTTP error, not JSON, the exporter's NVML down) raises SourceError: the gate
blocks with that reason unless fail-open was asked for.
"""

from __future__ import annotations

import base64
import json
import math
import os

from gate.readings import GpuSample, Holder, SourceError

CA_FILE_ENV = "GPU_RESIDENCY_EXPORTER_CA_FILE"
USER_ENV = "GPU_RESIDENCY_EXPORTER_USER"
PASSWORD_ENV = "GPU_RESIDENCY_EXPORTER_PASSWORD"
PASSWORD_FILE_ENV = "GPU_RESIDENCY_EXPORTER_PASSWORD_FILE"
MAX_BODY = 16 * 1024**2


class ExporterSource:
    """A fresh reading per look from the exporter's JSON API; waits by long poll."""

    name = "exporter"
    remote = True  # the exporter's view of the node: asked by UUID
    poll_floor_s = 0.0

    def __init__(
        self,
        url: str,
        timeout: float = 5.0,
        ca_file: str | None = None,
        username: str | None = None,
        password: str | None = None,
        password_file: str | None = None,
    ) -> None:
        """`url`: the exporter's base URL (http://node:9852; a trailing /metrics is dropped).
        `timeout`: seconds a plain read may take, and how long past a long poll's own timeout
        an answer may be late. HTTPS verifies the exporter's certificate against `ca_file`
        (else the system's CAs). Basic auth: `username` with `password` or `password_file`.
        Each option left out is read from the environment ($GPU_RESIDENCY_EXPORTER_CA_FILE,
        _USER, _PASSWORD, _PASSWORD_FILE)."""
        import ssl
        import urllib.parse
        import urllib.request

        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise SourceError(f"exporter source: {url!r} is not an http(s) base URL")
        base = url.rstrip("/")
        self._base = base.removesuffix("/metrics")
        if not timeout > 0:
            raise SourceError(f"exporter source: timeout={timeout!r} must be > 0")
        self._timeout = timeout
        if ca_file and parts.scheme != "https":
            raise SourceError(f"exporter source: a CA file was given for {url!r}, which is not https")
        handlers: list = []
        if parts.scheme == "https":
            ca_file = ca_file or os.environ.get(CA_FILE_ENV) or None
            try:
                context = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise SourceError(f"exporter source: cannot use CA file {ca_file}: {exc}") from None
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)
        self._headers = {"Accept": "application/json"}
        username = username if username is not None else os.environ.get(USER_ENV) or None
        if username:
            secret = self._password(password, password_file)
            token = base64.b64encode(f"{username}:{secret}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        elif password or password_file:
            raise SourceError("exporter source: a password was given without a user")

    @staticmethod
    def _password(password: str | None, password_file: str | None) -> str:
        if password is not None:
            return password
        path = password_file or os.environ.get(PASSWORD_FILE_ENV)
        if path:
            try:
                with open(path, encoding="utf-8") as handle:
                    return handle.read().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise SourceError(f"exporter source: cannot read the password file {path}: {exc}") from None
        if PASSWORD_ENV in os.environ:
            return os.environ[PASSWORD_ENV]
        raise SourceError(f"exporter source: a user was given without a password (${PASSWORD_ENV} or a file)")

    @property
    def url(self) -> str:
        return self._base

    def read(self, node: str) -> list[GpuSample]:
        """Every GPU of the exporter's node, from a fresh collection, with holders. The node is the
        exporter's: `node` is not used (a gate in a pod often has another host name)."""
        body = self._get("/api/v1/gpus", {}, self._timeout)
        return samples_from_api(body, self._base)

    def wait_until_under(self, node: str, names: list[str], threshold_bytes: int, timeout: float) -> list[GpuSample]:
        """One long poll: the exporter answers as soon as every GPU in `names` is under
        `threshold_bytes`, or after `timeout` seconds with its last reading. An exporter at its
        limit of waiters (HTTP 429) is read once instead."""
        query = {"gpus": ",".join(names), "threshold_bytes": str(int(threshold_bytes)), "timeout": f"{timeout:.3f}"}
        try:
            body = self._get("/api/v1/wait", query, timeout + self._timeout)
        except _Busy:
            return self.read(node)
        return samples_from_api(body, self._base)

    def _get(self, path: str, query: dict[str, str], timeout: float) -> object:
        import urllib.error
        import urllib.parse
        import urllib.request

        url = self._base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        request = urllib.request.Request(url, headers=self._headers)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                raw = response.read(MAX_BODY + 1)
        except urllib.error.HTTPError as exc:
            if exc.code == 429:
                raise _Busy() from None
            raise SourceError(f"exporter source: HTTP {exc.code} from {self._base}{path}{_hint(exc.code)}") from None
        except TimeoutError:
            raise SourceError(f"exporter source: no answer from {self._base} in {timeout:g}s") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                raise SourceError(f"exporter source: no answer from {self._base} in {timeout:g}s") from None
            raise SourceError(f"exporter source: cannot reach {self._base}: {reason}") from None
        except Exception as exc:  # http.client's own errors (a reply that is not HTTP, cut short)
            raise SourceError(f"exporter source: bad answer from {self._base}: {exc!r}") from None
        if len(raw) > MAX_BODY:
            raise SourceError(f"exporter source: {self._base}{path} answered more than {MAX_BODY} bytes")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise SourceError(f"exporter source: {self._base}{path} did not answer JSON") from None


class _Busy(Exception):
    """HTTP 429: the exporter serves its maximum of long polls."""


def _hint(code: int) -> str:
    if code == 401:
        return f": credentials missing or wrong (${USER_ENV}, ${PASSWORD_ENV})"
    if code == 404:
        return ": no such API (an exporter older than the JSON API, or not the exporter's URL)"
    return ""


def samples_from_api(body: object, where: str) -> list[GpuSample]:
    """GpuSamples from an /api/v1/gpus or /api/v1/wait answer; SourceError for anything else,
    and for an exporter whose NVML is down (the reason it gave)."""
    if not isinstance(body, dict):
        raise SourceError(f"exporter source: unexpected answer from {where}")
    if body.get("nvml_up") is not True:
        reason = body.get("reason") or "no reason given"
        raise SourceError(f"exporter source: the exporter's NVML is down: {str(reason)[:300]}")
    try:
        age = float(body.get("age_seconds") or 0.0)
        if not math.isfinite(age):
            raise ValueError(f"age_seconds {age}")
        return [_sample(gpu, max(0.0, age)) for gpu in body["gpus"]]
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise SourceError(f"exporter source: unexpected answer from {where}: {exc!r}") from None


def _sample(gpu: dict, age: float) -> GpuSample:
    used = gpu.get("used_bytes")
    if used is not None and (isinstance(used, bool) or not isinstance(used, int) or used < 0):
        raise ValueError(f"used_bytes {used!r}")
    holders = [Holder("engine", str(e["engine"]), int(e["used_bytes"])) for e in gpu.get("engines") or ()]
    for proc in gpu.get("holders") or ():
        engine = str(proc.get("engine") or "")
        pid = proc.get("pid")
        holders.append(
            Holder(
                "process",
                # An engine's process is named by its title (its holder is the engine); any other by its holder.
                str(proc.get("comm") or "") if engine else str(proc.get("holder") or proc.get("comm") or ""),
                int(proc["used_bytes"]),
                engine=engine,
                pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
                role=str(proc.get("kind") or ""),
            )
        )
    if gpu.get("unattributed_bytes") is not None:
        holders.append(Holder("unattributed", "", int(gpu["unattributed_bytes"])))
    index = gpu.get("index")
    return GpuSample(
        index=index if isinstance(index, int) and not isinstance(index, bool) else None,
        uuid=str(gpu.get("uuid") or ""),
        pci_bus_id=str(gpu.get("pci_bus_id") or ""),
        used_bytes=used,
        age_seconds=age,
        holders=tuple(sorted(holders, key=lambda h: -h.used_bytes)),
        holders_known=gpu.get("processes_known") is True,
    )
