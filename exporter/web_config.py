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


class WebConfigError(ValueError):
    """A web config that cannot be used; the message names the file and the key."""


TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's names (crypto/tls CipherSuites(), what exporter-toolkit accepts) -> OpenSSL's. TLS 1.3 suites
# are accepted and, as in Go, not configurable.
CIPHER_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
}
CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1", "X25519": "X25519"}
CLIENT_AUTH = {"": ssl.CERT_NONE, "NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
               "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}  # fmt: skip
UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
# exporter-toolkit's allowed extra response headers, with the values it allows (None: any).
HEADERS = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "cipher_suites", "curve_preferences",
            "min_version", "max_version", "prefer_server_cipher_suites", "client_allowed_sans"}  # fmt: skip
INLINE_KEYS = {"cert": "cert_file", "key": "key_file", "client_ca": "client_ca_file"}
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
    _no_unknown(path, "", data, {"tls_server_config", "basic_auth_users", "http_server_config"})
    base = Path(path).resolve().parent
    tls_section = data.get("tls_server_config")
    users = _users(path, data.get("basic_auth_users"))
    costs = [int(match.group(1)) for hashed in users.values() if (match := _BCRYPT_COST.match(hashed.decode()))]
    return WebConfig(
        tls=_tls(path, tls_section, base),
        users=users,
        allowed_sans=frozenset(
            _strings(path, "tls_server_config.client_allowed_sans", tls_section, "client_allowed_sans")
        ),
        headers=_headers(path, data.get("http_server_config")),
        _dummy_hash=bcrypt.hashpw(b"dummy", bcrypt.gensalt(rounds=max(costs, default=4))) if users else b"",
    )


def _no_unknown(path: str, where: str, section: dict, known: set[str]) -> None:
    inline = sorted(set(section) & set(INLINE_KEYS)) if where == "tls_server_config." else []
    if inline:
        raise WebConfigError(
            f"{path}: {where}{inline[0]}: inline certificates are not supported; use {INLINE_KEYS[inline[0]]}"
        )
    unknown = sorted(set(section) - known)
    if unknown:
        raise WebConfigError(f"{path}: unknown keys {[where + key for key in unknown]}")


def _strings(path: str, where: str, section: object, key: str) -> list[str]:
    value = section.get(key) if isinstance(section, dict) else None
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise WebConfigError(f"{path}: {where} must be a list of strings")
    return value


def _tls(path: str, section: object, base: Path) -> ssl.SSLContext | None:
    if section is None:
        return None
    if not isinstance(section, dict):
        raise WebConfigError(f"{path}: tls_server_config must be a mapping")
    _no_unknown(path, "tls_server_config.", section, TLS_KEYS)
    cert, key = section.get("cert_file") or "", section.get("key_file") or ""
    auth, client_ca = section.get("client_auth_type") or "", section.get("client_ca_file") or ""
    if not (cert or key or auth or client_ca):
        return None  # an empty section: plain HTTP, as exporter-toolkit does
    if not cert:
        raise WebConfigError(f"{path}: tls_server_config: missing cert_file")
    if not key:
        raise WebConfigError(f"{path}: tls_server_config: missing key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _version(path, "min_version", section.get("min_version", "TLS12"))
    context.maximum_version = _version(path, "max_version", section.get("max_version", "TLS13"))
    if context.minimum_version > context.maximum_version:
        raise WebConfigError(f"{path}: tls_server_config: min_version is above max_version")
    _ciphers(path, context, _strings(path, "tls_server_config.cipher_suites", section, "cipher_suites"))
    curves = _strings(path, "tls_server_config.curve_preferences", section, "curve_preferences")
    unknown = [curve for curve in curves if curve not in CURVES]
    if unknown:
        raise WebConfigError(f"{path}: tls_server_config.curve_preferences: unknown curve: {unknown[0]}")
    if len(curves) > 1:
        raise WebConfigError(
            f"{path}: tls_server_config.curve_preferences: Python's ssl module sets one curve, not a preference "
            "list: give one"
        )
    if curves:
        context.set_ecdh_curve(CURVES[curves[0]])
    if section.get("prefer_server_cipher_suites", True):
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    context.verify_mode = _client_auth(path, auth, client_ca)
    if section.get("client_allowed_sans") and auth != "RequireAndVerifyClientCert":
        raise WebConfigError(
            f"{path}: tls_server_config.client_allowed_sans needs client_auth_type: RequireAndVerifyClientCert"
        )
    try:
        context.load_cert_chain(base / cert, base / key)
        if client_ca:
            context.load_verify_locations(base / client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise WebConfigError(f"{path}: tls_server_config: {exc}") from None
    return context


def _version(path: str, key: str, value: object) -> ssl.TLSVersion:
    if value not in TLS_VERSIONS:
        raise WebConfigError(f"{path}: tls_server_config.{key}: unknown TLS version: {value} (TLS10..TLS13)")
    return TLS_VERSIONS[value]


def _ciphers(path: str, context: ssl.SSLContext, names: list[str]) -> None:
    unknown = [name for name in names if name not in CIPHER_SUITES]
    if unknown:
        raise WebConfigError(f"{path}: tls_server_config.cipher_suites: unknown cipher: {unknown[0]}")
    openssl = [CIPHER_SUITES[name] for name in names if CIPHER_SUITES[name]]
    if openssl:
        context.set_ciphers(":".join(openssl))


def _client_auth(path: str, auth: str, client_ca: str) -> ssl.VerifyMode:
    if auth in UNVERIFIED_CLIENT_AUTH:
        raise WebConfigError(
            f"{path}: tls_server_config.client_auth_type {auth} asks for a client certificate without verifying "
            "it, which Python's ssl module cannot do: use VerifyClientCertIfGiven or RequireAndVerifyClientCert"
        )
    if auth not in CLIENT_AUTH:
        raise WebConfigError(f"{path}: tls_server_config: Invalid ClientAuth: {auth}")
    mode = CLIENT_AUTH[auth]
    if client_ca and mode == ssl.CERT_NONE:
        raise WebConfigError(
            f"{path}: tls_server_config: Client CA's have been configured without a Client Auth Policy"
        )
    if mode != ssl.CERT_NONE and not client_ca:
        raise WebConfigError(f"{path}: tls_server_config: client_auth_type {auth} needs client_ca_file")
    return mode


def _headers(path: str, section: object) -> tuple[tuple[str, str], ...]:
    if section is None:
        return ()
    if not isinstance(section, dict):
        raise WebConfigError(f"{path}: http_server_config must be a mapping")
    _no_unknown(path, "http_server_config.", section, {"headers", "http2"})
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
