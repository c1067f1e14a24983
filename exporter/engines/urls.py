"""Where the exporter can reach an engine whose registry entry was written in another network namespace."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from exporter.engines.discovery import is_loopback_or_any
from exporter.engines.registry import EngineEntry


def reachable_url(entry: EngineEntry, own_net_ns: int | None) -> tuple[str | None, str | None]:
    """(URL the exporter should use, why it cannot) for an entry's URL.

    A loopback URL written in another network namespace (another pod) names that pod's
    loopback, which the exporter cannot reach: it is rewritten to the writer's advertised
    address when the entry has one (the URL policy still decides whether that address may
    be polled), else refused with the reason."""
    if entry.url is None or entry.net_ns is None or own_net_ns is None or entry.net_ns == own_net_ns:
        return entry.url, None
    try:
        parts = urlsplit(entry.url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return entry.url, None  # the URL policy explains what is wrong with it
    if not is_loopback_or_any(host):
        return entry.url, None
    if entry.advertise_host is None:
        return None, (
            f"{entry.url} is the loopback of another network namespace (another pod) and the entry has no "
            "advertise_host ($POD_IP at registration); register a URL the exporter can reach"
        )
    shown = f"[{entry.advertise_host}]" if ":" in entry.advertise_host else entry.advertise_host
    netloc = f"{shown}:{port}" if port else shown
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), None
