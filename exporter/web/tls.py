"""The TLS half of the web config (tls_server_config): an ssl.SSLContext as exporter-toolkit would
configure it, or an error naming the file and the key; and the checks every section shares."""

from __future__ import annotations

import ssl
from pathlib import Path


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
TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "cipher_suites", "curve_preferences",
            "min_version", "max_version", "prefer_server_cipher_suites", "client_allowed_sans"}  # fmt: skip
INLINE_KEYS = {"cert": "cert_file", "key": "key_file", "client_ca": "client_ca_file"}


def no_unknown(path: str, where: str, section: dict, known: set[str]) -> None:
    inline = sorted(set(section) & set(INLINE_KEYS)) if where == "tls_server_config." else []
    if inline:
        raise WebConfigError(
            f"{path}: {where}{inline[0]}: inline certificates are not supported; use {INLINE_KEYS[inline[0]]}"
        )
    unknown = sorted(set(section) - known)
    if unknown:
        raise WebConfigError(f"{path}: unknown keys {[where + key for key in unknown]}")


def strings(path: str, where: str, section: object, key: str) -> list[str]:
    value = section.get(key) if isinstance(section, dict) else None
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise WebConfigError(f"{path}: {where} must be a list of strings")
    return value


def tls_context(path: str, section: object, base: Path) -> ssl.SSLContext | None:
    if section is None:
        return None
    if not isinstance(section, dict):
        raise WebConfigError(f"{path}: tls_server_config must be a mapping")
    no_unknown(path, "tls_server_config.", section, TLS_KEYS)
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
    _ciphers(path, context, strings(path, "tls_server_config.cipher_suites", section, "cipher_suites"))
    curves = strings(path, "tls_server_config.curve_preferences", section, "curve_preferences")
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
