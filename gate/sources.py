"""Where the gate reads whole-GPU used memory, and which source a configuration names.

Each source returns the node's GPUs as GpuSample or raises SourceError; the gate picks the
requested GPUs. A source's module (and its dependency: nvidia-ml-py for NVML) is imported when
the source is built, so `import gate` stays free of everything outside the standard library.
"""

from __future__ import annotations

from typing import Protocol

from gate.readings import GpuSample, SourceError, names_mig, refuse_mig
from gate.settings import EXPORTER_ENV, PROMETHEUS_ENV, SOURCES, GateConfigError


class Source(Protocol):
    """What every source has. A source may also have (the gate uses them when present):

    - `read_used(node)`: like read(), used memory only (no holders), cheap enough to repeat
      every few milliseconds while a wait is close to clearing;
    - `wait_until_under(node, names, threshold_bytes, timeout)`: one long poll, answered as
      soon as every named GPU is under the threshold or at `timeout`, with the samples;
    - `read_named(node, names)`: like read(), asking only for the named GPUs (UUIDs, bus ids);
    - `poll_floor_s`: the shortest sensible time between two looks (a process per look,
      a scrape interval behind the data);
    - `remote = True`: it reads another view than this process's (the node's exporter,
      Prometheus): an index is resolved in this process's view and asked by UUID;
    - `reads_mig = True`: its samples include MIG devices (named MIG-... or `gpu:gi`); a gate
      refuses MIG names for a source without it, and calls its `include_mig()`, if it has one,
      when a MIG name is asked for (nvidia-smi reads them only then)."""

    name: str

    def read(self, node: str) -> list[GpuSample]: ...


def admit_mig(source: Source, names: list[str]) -> list[str]:
    """`names`, once the source can read the MIG devices among them: ValueError (with the reason)
    where it cannot; a source that reads them only when asked (nvidia-smi) is told to."""
    if not getattr(source, "reads_mig", False):
        for name in names:
            refuse_mig(name, f"the {source.name} source")
    elif any(names_mig(name) for name in names) and hasattr(source, "include_mig"):
        source.include_mig()
    return names


def build_source(
    kind: str,
    prometheus_url: str | None,
    timeout: float = 5.0,
    exporter_url: str | None = None,
    exporter_options: dict | None = None,
    prometheus_selector: str | None = None,
) -> Source:
    """The named source; 'auto' is the exporter if its URL is set, else Prometheus if a URL is
    set, else NVML, else nvidia-smi.

    `timeout`: seconds one read may take (the query, the NVML calls, the nvidia-smi run).
    `exporter_options`: ExporterSource's keyword arguments (ca_file, username, password,
    password_file). The NVML source is the process's shared one (NvmlSource.shared).
    `prometheus_selector`: label matchers the Prometheus source adds to every query (cluster="a");
    checked whichever source is built, used only by that one (the others read one node anyway)."""
    from gate.prometheus_source import PrometheusSource, parse_selector

    parse_selector(prometheus_selector)
    if kind not in SOURCES:
        raise GateConfigError(f"source {kind!r} must be one of {', '.join(SOURCES)}")
    if kind == "exporter" or (kind == "auto" and exporter_url):
        if not exporter_url:
            raise GateConfigError(f"the exporter source needs a URL (--exporter-url or ${EXPORTER_ENV})")
        from gate.exporter_source import ExporterSource

        try:
            return ExporterSource(exporter_url, timeout=timeout, **(exporter_options or {}))
        except SourceError as exc:
            raise GateConfigError(str(exc)) from None
    if kind == "prometheus" or (kind == "auto" and prometheus_url):
        if not prometheus_url:
            raise GateConfigError(f"the prometheus source needs a URL (--prometheus-url or ${PROMETHEUS_ENV})")
        try:
            return PrometheusSource(prometheus_url, timeout=timeout, selector=prometheus_selector)
        except SourceError as exc:
            raise GateConfigError(str(exc)) from None
    from gate.nvml_source import NvmlSource
    from gate.smi_source import NvidiaSmiSource

    if kind == "nvidia-smi":
        try:
            return NvidiaSmiSource(timeout=timeout)
        except SourceError as exc:
            raise GateConfigError(str(exc)) from None
    try:
        return NvmlSource.shared(timeout)
    except SourceError as exc:
        if kind == "nvml":
            raise GateConfigError(str(exc)) from None
        try:
            return NvidiaSmiSource(timeout=timeout)
        except SourceError:
            raise GateConfigError(
                f"no source available: {exc}; no nvidia-smi either; set an exporter URL (${EXPORTER_ENV}) "
                f"or a Prometheus URL (${PROMETHEUS_ENV})"
            ) from None
