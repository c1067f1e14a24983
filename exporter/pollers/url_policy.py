"""Which engine URLs the exporter may request: it must never become a proxy to arbitrary hosts.

Anyone who can write a registry entry chooses a URL; the exporter runs with hostPID on
every GPU node. So only http(s) base URLs (scheme://host:port, nothing after) whose host is
an IP literal inside the allowed networks (loopback and this node's own addresses by
default) or a host name listed explicitly are polled. Host names are not resolved: a DNS
answer cannot widen the set.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from urllib.parse import urlsplit

import psutil

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def node_addresses() -> list[IPNetwork]:
    """This node's interface addresses, each as a single-address network."""
    networks: list[IPNetwork] = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    networks.append(ipaddress.ip_network(address.address.split("%")[0]))
                except ValueError:
                    continue
    return networks


class UrlPolicy:
    def __init__(self, networks: list[IPNetwork], names: set[str]) -> None:
        self._networks = networks
        self._names = {name.lower() for name in names}
        # Engines' URLs are checked on every scrape; the answer for a URL never changes.
        self.check = functools.lru_cache(maxsize=1024)(self._check)

    @classmethod
    def default(cls, extra: list[str] = ()) -> UrlPolicy:
        """Loopback, this node's addresses, 'localhost', plus `extra` (CIDRs, IPs or host names)."""
        networks: list[IPNetwork] = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
        networks += node_addresses()
        names = {"localhost"}
        for item in extra:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                names.add(item)
        return cls(networks, names)

    def _check(self, url: str) -> str | None:
        """None when `url` may be polled, else why not."""
        try:
            parts = urlsplit(url)
            host = parts.hostname
            _ = parts.port  # raises on a malformed port
        except ValueError as exc:
            return f"malformed URL ({exc})"
        if parts.scheme not in ("http", "https"):
            return f"scheme {parts.scheme!r} is not http or https"
        if not host:
            return "no host"
        if parts.username or parts.password:
            return "credentials in the URL are not allowed"
        if parts.path not in ("", "/") or parts.query or parts.fragment or "?" in url or "#" in url:
            # The pollers append their own paths: a base URL with a path or query would make them
            # request something else on the engine (http://host:port/flush_cache?x=).
            return "an engine URL is scheme://host:port only (no path, query or fragment)"
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None if host.lower() in self._names else f"host {host!r} is not in the allowed host names"
        if any(address in network for network in self._networks):
            return None
        return f"address {host} is outside the allowed networks"
