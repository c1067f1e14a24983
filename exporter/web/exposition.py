"""The Prometheus text format (0.0.4), written for our own families.

prometheus_client's encoder re-validates and re-escapes every label *name* of every sample
(for UTF-8 names); profiling a scrape showed that as the largest single cost after the
collection itself. Our names are fixed, valid identifiers, so only label values and help
texts are escaped here. The output is checked by promtool and prometheus_client's parser
in the tests; this format is what node_exporter serves too.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import Metric
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TYPES = {"counter": "counter", "gauge": "gauge", "histogram": "histogram", "summary": "summary"}


def _escape_value(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


class Exposition:
    """Writes families as text, remembering what it wrote: a node's label sets and values mostly stay
    the same from one scrape to the next, so each sample's label text and each value's text is built
    once and looked up after (both bounded: cleared past MAX_REMEMBERED). Safe to share between
    concurrent scrapes (dict operations only)."""

    MAX_REMEMBERED = 16384

    def __init__(self) -> None:
        self._prefixes: dict[tuple, str] = {}  # (sample name, label values) -> 'name{k="v",...} '
        self._values: dict[float, str] = {}
        self._headers: dict[tuple[str, str, str], str] = {}

    def render(self, families: Iterable[Metric]) -> bytes:
        out: list[str] = []
        prefixes, values = self._prefixes, self._values
        if len(prefixes) > self.MAX_REMEMBERED or len(values) > self.MAX_REMEMBERED:
            prefixes.clear()
            values.clear()
        for family in families:
            out.append(self._header(family))
            for sample in family.samples:
                key = (sample.name, *sample.labels.values())
                prefix = prefixes.get(key)
                if prefix is None:
                    prefix = prefixes[key] = _prefix(sample.name, sample.labels)
                value = values.get(sample.value)
                if value is None:
                    value = values[sample.value] = floatToGoString(sample.value)
                out.append(f"{prefix}{value}\n")
        return "".join(out).encode()

    def _header(self, family: Metric) -> str:
        key = (family.name, family.type, family.documentation)
        header = self._headers.get(key)
        if header is None:
            if len(self._headers) > self.MAX_REMEMBERED:
                self._headers.clear()
            name = family.name + "_total" if family.type == "counter" else family.name
            help_text = family.documentation.replace("\\", "\\\\").replace("\n", "\\n")
            header = f"# HELP {name} {help_text}\n# TYPE {name} {_TYPES.get(family.type, 'untyped')}\n"
            self._headers[key] = header
        return header


def _prefix(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return f"{name} "
    return name + "{" + ",".join(f'{key}="{_escape_value(value)}"' for key, value in labels.items()) + "} "


def render(families: Iterable[Metric]) -> bytes:
    """One rendering with nothing remembered (the server keeps an Exposition)."""
    return Exposition().render(families)
