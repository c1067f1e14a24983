"""The exporter source: the node's gpu-residency exporter answers with its own NVML reading, over
HTTP(S), without Prometheus' scrape interval in between.

    GET /api/v1/gpus                                        every GPU, with its holders
    GET /api/v1/wait?gpus=0,GPU-…&threshold_bytes=N&timeout=S
                                                            answered as soon as every named GPU is
                                                            under N, or at S with the last reading

Standard library only (gpu_residency_common.exporter_client, the one client every caller of the
exporter uses), imported when the source is built. Every failure (refused, no answer in time,
HTTP error, not JSON, the exporter's NVML down) raises SourceError: the gate blocks with that
reason unless fail-open was asked for.
"""

from __future__ import annotations

import math

from gate.readings import GpuSample, Holder, SourceError
from gpu_residency_common.exporter_client import ExporterClient, ExporterError


class ExporterSource:
    """A reading per look from the exporter's JSON API; waits by long poll."""

    name = "exporter"
    reads_mig = True  # the exporter lists each GPU's MIG devices under it (its /api/v1 answers)
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
        an answer may be late. TLS and basic auth as every exporter client takes them
        (gpu_residency_common.exporter_client): each option left out is read from the
        environment ($GPU_RESIDENCY_EXPORTER_CA_FILE, _USER, _PASSWORD, _PASSWORD_FILE)."""
        try:
            self._client = ExporterClient(url, timeout, ca_file, username, password, password_file)
        except ExporterError as exc:
            raise SourceError(f"exporter source: {exc}") from None

    @property
    def url(self) -> str:
        return self._client.url

    def read(self, node: str) -> list[GpuSample]:
        """Every GPU of the exporter's node, with holders, from its collection (at most
        --collection.min-interval old). The node is the exporter's: `node` is not used (a gate in
        a pod often has another host name)."""
        return samples_from_api(self._get("/api/v1/gpus", {}), self.url)

    def wait_until_under(self, node: str, names: list[str], threshold_bytes: int, timeout: float) -> list[GpuSample]:
        """One long poll: the exporter answers as soon as every GPU in `names` is under
        `threshold_bytes`, or after `timeout` seconds with its last reading. An exporter at its
        limit of waiters (HTTP 429) is read once instead."""
        query = {"gpus": ",".join(names), "threshold_bytes": str(int(threshold_bytes)), "timeout": f"{timeout:.3f}"}
        try:
            body = self._get("/api/v1/wait", query, timeout + self._client.timeout)
        except _Busy:
            return self.read(node)
        return samples_from_api(body, self.url)

    def _get(self, path: str, query: dict[str, str], timeout: float | None = None) -> object:
        try:
            return self._client.get_json(path, query, timeout)
        except ExporterError as exc:
            if exc.status == 429:
                raise _Busy() from None
            raise SourceError(f"exporter source: {exc}") from None


class _Busy(Exception):
    """HTTP 429: the exporter serves its maximum of long polls."""


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
        return [sample for gpu in body["gpus"] for sample in _samples(gpu, max(0.0, age))]
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise SourceError(f"exporter source: unexpected answer from {where}: {exc!r}") from None


def _engine(entry: dict) -> Holder:
    """An engine's entry: its memory, how much more each of its releases leaves on this GPU and what
    its own report cannot say it released, where the exporter knows them (anything else is ignored)."""
    growth = entry.get("residual_growth_bytes_per_cycle")
    unknown = entry.get("unknown_resources")
    return Holder(
        "engine",
        str(entry["engine"]),
        int(entry["used_bytes"]),
        growth_bytes_per_cycle=float(growth)
        if isinstance(growth, int | float) and not isinstance(growth, bool) and math.isfinite(growth)
        else None,
        unknown_resources=tuple(str(r)[:64] for r in unknown[:8] if isinstance(r, str))
        if isinstance(unknown, list)
        else (),
    )


def _samples(gpu: dict, age: float) -> list[GpuSample]:
    """The GPU's sample, then one per MIG device it lists (numbered and bused as their GPU)."""
    whole = _sample(gpu, age)
    devices = gpu.get("mig") or []  # absent from exporters before MIG support
    if not isinstance(devices, list):
        raise ValueError(f"mig {type(devices).__name__}")
    return [whole, *(_sample(device, age, whole) for device in devices)]


def _sample(gpu: dict, age: float, parent: GpuSample | None = None) -> GpuSample:
    used = gpu.get("used_bytes")
    if used is not None and (isinstance(used, bool) or not isinstance(used, int) or used < 0):
        raise ValueError(f"used_bytes {used!r}")
    holders = [_engine(e) for e in gpu.get("engines") or ()]
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
    index = gpu.get("index") if parent is None else parent.index
    instance = gpu.get("gpu_instance") if parent is not None else None
    if parent is not None and (isinstance(instance, bool) or not isinstance(instance, int)):
        raise ValueError(f"gpu_instance {instance!r}")
    return GpuSample(
        index=index if isinstance(index, int) and not isinstance(index, bool) else None,
        uuid=str(gpu.get("uuid") or ""),
        pci_bus_id=str(gpu.get("pci_bus_id") or "") if parent is None else parent.pci_bus_id,
        parent_uuid="" if parent is None else parent.uuid,
        gpu_instance=instance,
        used_bytes=used,
        age_seconds=age,
        holders=tuple(sorted(holders, key=lambda h: -h.used_bytes)),
        holders_known=gpu.get("processes_known") is True,
    )
