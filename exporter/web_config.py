"""TLS and basic auth for the HTTP endpoint, in the Prometheus exporter-toolkit web-config format:

    tls_server_config:
      cert_file: /etc/gpu-residency/tls.crt
      key_file: /etc/gpu-residency/tls.key
      client_ca_file: /etc/gpu-residency/ca.crt     # optional: require client certificates
      min_version: TLS12                           # or TLS13
    basic_auth_users:
      prometheus: $2b$12$...                       # bcrypt hash (htpasswd -nBC 12 "" | tr -d ':\\n')

The same file works for node_exporter and friends, so one secret serves all of them.
/healthz stays open (it says only "ok") so kubelet probes need no credentials.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import yaml


class WebConfigError(ValueError):
    """A web config that cannot be used; the message names the file and the key."""


_TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}


@dataclass
class WebConfig:
    tls: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    _verified: set[bytes] = field(default_factory=set)  # digests of headers already checked
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def authorized(self, header: str | None) -> bool:
        """True without users configured, else for a valid 'Basic ...' header."""
        if not self.users:
            return True
        if not header or not header.startswith("Basic "):
            return False
        digest = hashlib.sha256(header.encode()).digest()
        with self._lock:
            if digest in self._verified:  # bcrypt costs ~100 ms: check each credential once
                return True
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if hashed is None:
            bcrypt.checkpw(b"timing", _DUMMY_HASH)  # same cost whether or not the user exists
            return False
        if not bcrypt.checkpw(password.encode(), hashed):
            return False
        with self._lock:
            self._verified.add(digest)
        return True


_DUMMY_HASH = bcrypt.hashpw(b"dummy", bcrypt.gensalt(rounds=4))


def load_web_config(path: str) -> WebConfig:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise WebConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise WebConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise WebConfigError(f"{path}: must be a mapping")
    unknown = set(data) - {"tls_server_config", "basic_auth_users", "http_server_config"}
    if unknown:
        raise WebConfigError(f"{path}: unknown keys {sorted(unknown)}")
    return WebConfig(tls=_tls(path, data.get("tls_server_config")), users=_users(path, data.get("basic_auth_users")))


def _tls(path: str, section: object) -> ssl.SSLContext | None:
    if section is None:
        return None
    if not isinstance(section, dict) or not section.get("cert_file") or not section.get("key_file"):
        raise WebConfigError(f"{path}: tls_server_config needs cert_file and key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    version = section.get("min_version", "TLS12")
    if version not in _TLS_VERSIONS:
        raise WebConfigError(f"{path}: tls_server_config.min_version must be TLS12 or TLS13")
    context.minimum_version = _TLS_VERSIONS[version]
    try:
        context.load_cert_chain(section["cert_file"], section["key_file"])
        if section.get("client_ca_file"):
            context.load_verify_locations(section["client_ca_file"])
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise WebConfigError(f"{path}: tls_server_config: {exc}") from None
    return context


def _users(path: str, section: object) -> dict[str, bytes]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise WebConfigError(f"{path}: basic_auth_users must map user names to bcrypt hashes")
    users = {}
    for user, hashed in section.items():
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise WebConfigError(f"{path}: basic_auth_users.{user}: not a bcrypt hash")
        users[str(user)] = hashed.encode()
    return users
