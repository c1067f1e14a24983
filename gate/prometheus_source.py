"""The Prometheus source: one instant query per poll; samples carry their age."""

from __future__ import annotations

import dataclasses
import json
import math
import re

from gate.readings import GpuSample, Holder, SourceError, split_instance
from gate.settings import SELECTOR_ENV, GateConfigError

MIB = 1024**2


def escape_label_value(value: str) -> str:
    """A PromQL double-quoted string literal's content: nothing in it can end the string."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


GROWTH = "gpu_residency_engine_release_residual_growth_bytes_per_cycle"  # an engine's creep, per GPU
UNKNOWN = "gpu_residency_engine_release_unknown"  # per GPU: a resource an engine cannot say it released
METRICS = (
    "gpu_residency_memory_used_bytes",
    "gpu_residency_engine_memory_bytes",
    "gpu_residency_process_memory_bytes",
    "gpu_residency_unattributed_memory_bytes",
    GROWTH,
    UNKNOWN,
    "gpu_residency_mig_memory_used_bytes",
    "gpu_residency_mig_unattributed_memory_bytes",
)
USED = ("gpu_residency_memory_used_bytes", "gpu_residency_mig_memory_used_bytes")  # a GPU's, a MIG device's


SAMPLE_TIME_LABEL = "gate_field"  # marks the series that carry each GPU's sample time


UUID_PATTERN = re.compile(r"^GPU-[0-9A-Za-z-]+$")
# Labels that name a series within one reading, not the reading: the rest (replica, job,
# instance, prometheus...) tell copies of one GPU's reading apart.
SERIES_LABELS = ("__name__", SAMPLE_TIME_LABEL, "engine", "pid", "comm", "holder", "holder_kind", "container",
                 "container_id", "pod_uid", "kind", "mig_instance", "mig_profile", "mig_uuid")  # fmt: skip


# A label-matcher list and nothing else: name, operator, one quoted string (valid escapes only).
_QUOTED = r'"(?:[^"\\\n]|\\[\\"\'nrt])*"|\'(?:[^\'\\\n]|\\[\\"\'nrt])*\''
_MATCHER = rf"\s*(?!__name__\b)[a-zA-Z_][a-zA-Z0-9_]*\s*(?:=~|!~|!=|=)\s*(?:{_QUOTED})\s*"
SELECTOR_PATTERN = re.compile(rf"{_MATCHER}(?:,{_MATCHER})*,?\s*")
# Labels a scrape adds to every series of a target (Prometheus, the Prometheus Operator): they tell
# two exporters apart but say nothing a person would pick a cluster by.
TARGET_LABELS = ("instance", "job", "namespace", "pod", "service", "endpoint", "container")


def parse_selector(selector: str | None) -> str:
    """The label matchers every query of this source adds, e.g. `cluster="a"`: a matcher list
    only (no metric name, no braces), so nothing in it can reach outside the query's braces.
    GateConfigError for anything else."""
    text = (selector or "").strip()
    if text and not SELECTOR_PATTERN.fullmatch(text):
        raise GateConfigError(
            f'prometheus selector {selector!r} must be label matchers such as cluster="a" or '
            f'cluster="a", region=~"eu-.*" (quoted values, no braces, no __name__)'
        )
    return text.rstrip(", ")


def asks_by_uuid(names: list[str]) -> bool:
    """Every GPU is named by UUID (a MIG device by its GPU's, `GPU-...:gi`): the query asks by UUID,
    unambiguous in any number of clusters."""
    return bool(names) and all(UUID_PATTERN.match(split_instance(name)[0]) for name in names)


def build_query(node: str, uuids: list[str] = (), selector: str = "") -> str:
    """One instant query for a poll: used, engine, process and unattributed memory, and the time
    of each GPU's used sample (timestamp(), tagged so `or` keeps it beside the value). By UUID
    when every GPU asked for is named by one (a UUID names the card in every cluster, whatever
    the node is called), else the node's GPUs. `selector` (parse_selector's) narrows both.

    An instant query honours Prometheus' own staleness: once the exporter's target is down (or a
    series vanished), its series are absent rather than their last value."""
    names = "|".join(METRICS)
    parents = sorted({split_instance(name)[0] for name in uuids})
    match = f'uuid=~"(?i){"|".join(parents)}"' if asks_by_uuid(uuids) else f'node="{escape_label_value(node)}"'
    selector = f"{match},{selector}" if selector else match
    used = "|".join(USED)  # timestamp() drops the name: a GPU's and a device's labels still differ
    return (
        f'{{__name__=~"{names}",{selector}}} or label_replace(timestamp('
        f'{{__name__=~"{used}",{selector}}}), "{SAMPLE_TIME_LABEL}", "sample_time", "", "")'
    )


class PrometheusSource:
    """One instant query per poll against the Prometheus HTTP API; samples carry their age."""

    name = "prometheus"
    reads_mig = True  # the exporter's gpu_residency_mig_memory_used_bytes: MIG-... and `gpu:gi` name a device
    remote = True  # the exporter's view of the node: asked by UUID
    poll_floor_s = 0.1  # its data changes once per scrape interval; faster looks only load Prometheus

    def __init__(self, url: str, timeout: float = 5.0, selector: str | None = None) -> None:
        import urllib.parse  # here, not at the top: `import gate` stays fast where this source is unused

        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SourceError(f"prometheus source: {url!r} is not an http(s) URL")
        self._endpoint = url.rstrip("/") + "/api/v1/query"
        self._timeout = timeout
        self.selector = parse_selector(selector)

    def read(self, node: str) -> list[GpuSample]:
        return self.read_named(node, [])

    def read_named(self, node: str, names: list[str]) -> list[GpuSample]:
        """The GPUs named (by UUID: asked by UUID), else the node's: GateConfigError when that
        node name answers for several machines (two clusters' gpu-node-1) rather than mix them."""
        import urllib.error
        import urllib.parse
        import urllib.request

        query = build_query(node, names, self.selector)
        body = urllib.parse.urlencode({"query": query}).encode()
        request = urllib.request.Request(self._endpoint, data=body, method="POST")
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                payload = json.loads(response.read(16 * MIB))
        except urllib.error.HTTPError as exc:
            raise SourceError(f"prometheus source: HTTP {exc.code} from {self._endpoint}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SourceError(f"prometheus source: cannot reach {self._endpoint}: {reason}") from None
        except (ValueError, RecursionError):
            raise SourceError(f"prometheus source: {self._endpoint} did not answer JSON") from None
        samples = samples_from_answer(payload)
        if not asks_by_uuid(names):
            machines = machines_behind(payload["data"]["result"])
            if len(machines) > 1:
                raise GateConfigError(
                    f"prometheus source: node {node!r} is {len(machines)} machines here ({'; '.join(machines)}): "
                    f"give a label selector for one (--prometheus-selector or ${SELECTOR_ENV}, e.g. "
                    f"{machines[0].split(', ')[0]}), or name the GPUs by UUID"
                )
        return samples

    @staticmethod
    def _samples(result: list) -> list[GpuSample]:
        """Samples from an instant query's result, one per copy of a GPU's reading (HA replicas, two
        scrape jobs: told apart by `origin`); KeyError/TypeError/ValueError/IndexError on a bad shape."""
        used: dict[str, list[dict]] = {}  # GPU or MIG device UUID -> copies of its used series
        sampled_at: dict[frozenset, float] = {}
        evaluated_at = 0.0
        holder_series: dict[str, list[tuple[dict, Holder]]] = {}
        growth_series: dict[str, list[tuple[dict, float]]] = {}
        unknown_series: dict[str, list[dict]] = {}
        for series in result:
            labels = series["metric"]
            stamp, value = float(series["value"][0]), float(series["value"][1])
            evaluated_at = max(evaluated_at, stamp)
            if not math.isfinite(value):
                continue
            name, uuid, device = labels.get("__name__"), labels.get("uuid", ""), labels.get("mig_uuid", "")
            if labels.get(SAMPLE_TIME_LABEL) == "sample_time":
                sampled_at[_reading_key(labels)] = value
            elif name in USED:
                used.setdefault(device or uuid, []).append({**labels, "__value__": value})
            elif name == GROWTH:
                growth_series.setdefault(uuid, []).append((labels, value))
            elif name == UNKNOWN:
                unknown_series.setdefault(uuid, []).append(labels)
            else:
                holder = _holder(name, labels, int(value))
                if holder is not None and device:  # on a MIG device: its holder, and (but for what
                    holder_series.setdefault(device, []).append((labels, holder))  # it leaves) its GPU's
                if holder is not None and name != "gpu_residency_mig_unattributed_memory_bytes":
                    holder_series.setdefault(uuid, []).append((labels, holder))
        samples = []
        for uuid, copies in used.items():
            keys = sorted({key for copy in copies for key in copy} - {"__value__", *SERIES_LABELS})
            differing = [key for key in keys if len({copy.get(key, "") for copy in copies}) > 1]
            for copy in copies:
                origin = tuple((key, copy.get(key, "")) for key in differing)
                mine = [h for lbl, h in holder_series.get(uuid, ()) if _from(origin, lbl)]
                growth = {
                    lbl.get("engine", ""): value for lbl, value in growth_series.get(uuid, ()) if _from(origin, lbl)
                }
                unknown: dict[str, tuple[str, ...]] = {}
                for lbl in unknown_series.get(uuid, ()):
                    if _from(origin, lbl):
                        engine = lbl.get("engine", "")
                        unknown[engine] = tuple(sorted({*unknown.get(engine, ()), lbl.get("resource", "")}))
                mine = [
                    dataclasses.replace(
                        h, growth_bytes_per_cycle=growth.get(h.name), unknown_resources=unknown.get(h.name, ())
                    )
                    if h.kind == "engine"
                    else h
                    for h in mine
                ]
                sampled = sampled_at.get(_reading_key(copy))
                # Age against Prometheus' own evaluation time: no clock skew between this host and it.
                age = evaluated_at - sampled if sampled is not None else math.inf
                gpu, instance = copy.get("gpu", ""), copy.get("mig_instance", "").split("/")[0]
                samples.append(
                    GpuSample(
                        index=int(gpu) if gpu.isdigit() else None,
                        uuid=uuid,
                        pci_bus_id=copy.get("pci_bus_id", ""),
                        used_bytes=int(copy["__value__"]),
                        age_seconds=max(0.0, age),
                        holders=_merged(mine),
                        origin=origin,
                        # The exporter publishes a GPU's processes, and what they leave unattributed, only
                        # once it has listed them: with neither series, who holds the GPU is not known.
                        holders_known=any(h.kind in ("unattributed", "process") for h in mine),
                        parent_uuid=copy.get("uuid", "") if copy.get("mig_uuid") else "",
                        gpu_instance=int(instance) if copy.get("mig_uuid") and instance.isdigit() else None,
                    )
                )
        return samples


def machines_behind(result: list) -> list[str]:
    """The machines a node's used series come from, each as the labels that tell it apart, e.g.
    ['cluster="a"', 'cluster="b"']: labels the same on every copy of each card (unlike an HA pair's
    `replica`, which differs between copies of one card) but not on every card. Target labels
    (instance, ...) are named only when nothing else tells the machines apart."""
    used = [s["metric"] for s in result if s["metric"].get("__name__") == "gpu_residency_memory_used_bytes"]
    cards: dict[str, list[dict]] = {}
    for labels in used:
        cards.setdefault(labels.get("uuid", "").lower(), []).append(labels)
    keys = {key for labels in used for key in labels} - {"__name__", "node", "gpu", "uuid", "pci_bus_id", "model"}
    telling = sorted(
        key
        for key in keys
        if len({labels.get(key, "") for labels in used}) > 1
        and all(len({copy.get(key, "") for copy in copies}) == 1 for copies in cards.values())
    )
    named = [key for key in telling if key not in TARGET_LABELS] or telling
    return sorted({", ".join(f'{key}="{labels.get(key, "")}"' for key in named) for labels in used}) if named else []


def _from(origin: tuple[tuple[str, str], ...], labels: dict) -> bool:
    """The series belongs to the copy of a reading that `origin` names (HA replicas, two scrape jobs)."""
    return all(labels.get(key, "") == value for key, value in origin)


def _reading_key(labels: dict) -> frozenset:
    """What pairs a used series with its sample time: every label but the metric name and our tag."""
    return frozenset((k, v) for k, v in labels.items() if k not in ("__name__", SAMPLE_TIME_LABEL, "__value__"))


def samples_from_answer(payload: object) -> list[GpuSample]:
    """The samples in a Prometheus /api/v1/query answer; SourceError for anything else."""
    if not isinstance(payload, dict):
        raise SourceError("prometheus source: query failed: unexpected answer")
    data = payload.get("data")
    if payload.get("status") != "success" or not isinstance(data, dict) or data.get("resultType") != "vector":
        raise SourceError(f"prometheus source: query failed: {payload.get('error', 'unexpected answer')}")
    try:
        return PrometheusSource._samples(data["result"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
        raise SourceError(f"prometheus source: unexpected answer: {exc!r}") from None


def _merged(holders: list[Holder]) -> tuple[Holder, ...]:
    """Largest first, an engine's rows on several MIG devices of one GPU summed into one (its creep,
    known per GPU, kept)."""
    engines: dict[str, Holder] = {}
    for holder in holders:
        if holder.kind == "engine":
            seen = engines.get(holder.name)
            engines[holder.name] = (
                holder if seen is None else dataclasses.replace(seen, used_bytes=seen.used_bytes + holder.used_bytes)
            )
    rest = [h for h in holders if h.kind != "engine"] + list(engines.values())
    return tuple(sorted(rest, key=lambda h: -h.used_bytes))


def _holder(name: str, labels: dict, value: int) -> Holder | None:
    if name == "gpu_residency_engine_memory_bytes":
        return Holder("engine", labels.get("engine", ""), value)
    if name == "gpu_residency_process_memory_bytes":
        pid, engine = labels.get("pid", ""), labels.get("engine", "")
        # An engine's process is named by its title (its holder is the engine); any other by its holder.
        return Holder(
            "process",
            labels.get("comm", "") if engine else labels.get("holder") or labels.get("comm", ""),
            value,
            engine=engine,
            pid=int(pid) if pid.isdigit() else None,
            role=labels.get("holder_kind", ""),
        )
    if name in ("gpu_residency_unattributed_memory_bytes", "gpu_residency_mig_unattributed_memory_bytes"):
        return Holder("unattributed", "", value)
    return None
