"""TLS and basic auth for the HTTP endpoint, in the Prometheus exporter-toolkit web-config format:

    tls_server_config:
      cert_file: /etc/gpu-residency/tls.crt        # relative paths: from the config file's directory
      key_file: /etc/gpu-residency/tls.key
      client_auth_type: RequireAndVerifyClientCert  # with client_ca_file: mutual TLS
      client_ca_file: /etc/gpu-residency/ca.crt
      client_allowed_sans: [prometheus.monitoring.svc]
      min_version: TLS12                           # TLS10..TLS13; max_version likewise (default TLS13)
      cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]   # Go's names; TLS 1.2 and older
      curve_preferences: [X25519]
      prefer_server_cipher_suites: true
    http_server_config:
      headers: {Strict-Transport-Security: max-age=31536000}
    basic_auth_users:
      prometheus: $2b$12$...                       # bcrypt hash (htpasswd -nBC 12 "" | tr -d ':\\n')

The same file works for node_exporter and friends, so one secret serves all of them. Every key
exporter-toolkit defines is implemented or refused with the reason (Python's ssl module cannot
request a client certificate without verifying it, nor set several curves); an unknown key is
an error, as its strict YAML reading makes it. /healthz stays open (it says only "ok") so
kubelet probes need no credentials.
"""

from __future__ import annotations

import base64
import hashlib
import re
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import yaml

from exporter.web.tls import WebConfigError, no_unknown, strings, tls_context

__all__ = ["BCRYPT_MAX_PASSWORD", "WebConfig", "WebConfigError", "load_web_config"]

# exporter-toolkit's allowed extra response headers, with the values it allows (None: any).
HEADERS = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
_BCRYPT_COST = re.compile(r"^\$2[aby]\$(\d\d)\$")
_BCRYPT_HASH = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")
BCRYPT_MAX_PASSWORD = 72  # bytes; bcrypt's own limit


@dataclass
class WebConfig:
    tls: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    allowed_sans: frozenset[str] = frozenset()
    headers: tuple[tuple[str, str], ...] = ()
    _dummy_hash: bytes = b""
    _verified: set[bytes] = field(default_factory=set)  # digests of headers already checked
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def refusal(self, header: str | None) -> str | None:
        """None when the request may pass (no users configured, or a valid 'Basic ...' header), else
        why not, for the log. Never raises: whatever a client sends is a 401, not a 500."""
        if not self.users:
            return None
        if not header:
            return "no credentials"
        if not header.startswith("Basic "):
            return "not basic auth"
        digest = hashlib.sha256(header.encode()).digest()
        with self._lock:
            if digest in self._verified:  # bcrypt costs ~100 ms: check each credential once
                return None
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return "malformed credentials"
        secret = password.encode()
        if len(secret) > BCRYPT_MAX_PASSWORD:
            # bcrypt 5 refuses these (older releases silently compared the first 72 bytes only).
            return f"password longer than bcrypt's {BCRYPT_MAX_PASSWORD} bytes"
        hashed = self.users.get(user)
        if hashed is None:
            # A hash of the configured users' cost: an unknown user takes as long as a wrong password.
            _checkpw(secret, self._dummy_hash)
            return "unknown user"
        if not _checkpw(secret, hashed):
            return "wrong password"
        with self._lock:
            self._verified.add(digest)
        return None

    def client_allowed(self, peer_cert: dict | None) -> bool:
        """client_allowed_sans: the verified client certificate names one of them."""
        if not self.allowed_sans:
            return True
        names = {value for _, value in (peer_cert or {}).get("subjectAltName", ())}
        return bool(names & self.allowed_sans)


def _checkpw(password: bytes, hashed: bytes) -> bool:
    """bcrypt.checkpw, False for a password bcrypt refuses rather than an exception."""
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False


def load_web_config(path: str) -> WebConfig:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise WebConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise WebConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise WebConfigError(f"{path}: must be a mapping")
    no_unknown(path, "", data, {"tls_server_config", "basic_auth_users", "http_server_config"})
    base = Path(path).resolve().parent
    tls_section = data.get("tls_server_config")
    users = _users(path, data.get("basic_auth_users"))
    costs = [int(match.group(1)) for hashed in users.values() if (match := _BCRYPT_COST.match(hashed.decode()))]
    return WebConfig(
        tls=tls_context(path, tls_section, base),
        users=users,
        allowed_sans=frozenset(
            strings(path, "tls_server_config.client_allowed_sans", tls_section, "client_allowed_sans")
        ),
        headers=_headers(path, data.get("http_server_config")),
        _dummy_hash=bcrypt.hashpw(b"dummy", bcrypt.gensalt(rounds=max(costs, default=4))) if users else b"",
    )


def _headers(path: str, section: object) -> tuple[tuple[str, str], ...]:
    if section is None:
        return ()
    if not isinstance(section, dict):
        raise WebConfigError(f"{path}: http_server_config must be a mapping")
    no_unknown(path, "http_server_config.", section, {"headers", "http2"})
    if not isinstance(section.get("http2", True), bool):
        raise WebConfigError(f"{path}: http_server_config.http2 must be true or false")
    # http2: Prometheus scrapes over HTTP/1.1 either way; this server speaks HTTP/1.1 only.
    headers = section.get("headers") or {}
    if not isinstance(headers, dict):
        raise WebConfigError(f"{path}: http_server_config.headers must map header names to values")
    out = []
    for name, value in headers.items():
        allowed = next((values for known, values in HEADERS.items() if known.lower() == str(name).lower()), "unknown")
        if allowed == "unknown":
            raise WebConfigError(f"{path}: http_server_config.headers: {name} is not one of {', '.join(HEADERS)}")
        if not isinstance(value, str) or (allowed is not None and value.lower() not in allowed):
            raise WebConfigError(f"{path}: http_server_config.headers.{name}: invalid value {value!r}")
        out.append((str(name), value))
    return tuple(out)


def _users(path: str, section: object) -> dict[str, bytes]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise WebConfigError(f"{path}: basic_auth_users must map user names to bcrypt hashes")
    users = {}
    for user, hashed in section.items():
        if not isinstance(hashed, str) or not _BCRYPT_HASH.match(hashed):
            raise WebConfigError(f"{path}: basic_auth_users.{user}: not a bcrypt hash")
        users[str(user)] = hashed.encode()
    return users
