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


def render(families: Iterable[Metric]) -> bytes:
    out: list[str] = []
    for family in families:
        name = family.name + "_total" if family.type == "counter" else family.name
        help_text = family.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} {_TYPES.get(family.type, 'untyped')}\n")
        for sample in family.samples:
            if sample.labels:
                labels = ",".join(f'{key}="{_escape_value(value)}"' for key, value in sample.labels.items())
                out.append(f"{sample.name}{{{labels}}} {floatToGoString(sample.value)}\n")
            else:
                out.append(f"{sample.name} {floatToGoString(sample.value)}\n")
    return "".join(out).encode()
