"""The Prometheus source: one instant query per poll; samples carry their age."""

from __future__ import annotations

import json
import math

from gate.readings import GpuSample, Holder, SourceError

MIB = 1024**2


def escape_label_value(value: str) -> str:
    """A PromQL double-quoted string literal's content: nothing in it can end the string."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


METRICS = (
    "gpu_residency_memory_used_bytes",
    "gpu_residency_engine_memory_bytes",
    "gpu_residency_process_memory_bytes",
    "gpu_residency_unattributed_memory_bytes",
)


SAMPLE_TIME_LABEL = "gate_field"  # marks the series that carry each GPU's sample time


def build_query(node: str) -> str:
    """One instant query for a poll: the node's used, engine, process and unattributed memory, and
    the time of each GPU's used sample (timestamp(), tagged so `or` keeps it beside the value).

    An instant query honours Prometheus' own staleness: once the exporter's target is down (or a
    series vanished), its series are absent rather than their last value."""
    names = "|".join(METRICS)
    node_literal = escape_label_value(node)
    return (
        f'{{__name__=~"{names}",node="{node_literal}"}} or label_replace(timestamp('
        f'gpu_residency_memory_used_bytes{{node="{node_literal}"}}), "{SAMPLE_TIME_LABEL}", "sample_time", "", "")'
    )


class PrometheusSource:
    """One instant query per poll against the Prometheus HTTP API; samples carry their age."""

    name = "prometheus"
    poll_floor_s = 0.1  # its data changes once per scrape interval; faster looks only load Prometheus

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        import urllib.parse  # here, not at the top: `import gate` stays fast where this source is unused

        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SourceError(f"prometheus source: {url!r} is not an http(s) URL")
        self._endpoint = url.rstrip("/") + "/api/v1/query"
        self._timeout = timeout

    def read(self, node: str) -> list[GpuSample]:
        import urllib.error
        import urllib.parse
        import urllib.request

        body = urllib.parse.urlencode({"query": build_query(node)}).encode()
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
        return samples_from_answer(payload)

    @staticmethod
    def _samples(result: list) -> list[GpuSample]:
        """Samples from an instant query's result; KeyError/TypeError/ValueError/IndexError on a bad shape."""
        used: dict[str, tuple[dict, float]] = {}
        sampled_at: dict[str, float] = {}
        evaluated_at = 0.0
        holders: dict[str, list[Holder]] = {}
        for series in result:
            labels = series["metric"]
            stamp, value = float(series["value"][0]), float(series["value"][1])
            evaluated_at = max(evaluated_at, stamp)
            if not math.isfinite(value):
                continue
            name, uuid = labels.get("__name__"), labels.get("uuid", "")
            if labels.get(SAMPLE_TIME_LABEL) == "sample_time":
                sampled_at[uuid] = value
            elif name == "gpu_residency_memory_used_bytes":
                used[uuid] = (labels, value)
            else:
                holder = _holder(name, labels, int(value))
                if holder is not None:
                    holders.setdefault(uuid, []).append(holder)
        samples = []
        for uuid, (labels, value) in used.items():
            gpu = labels.get("gpu", "")
            # Age against Prometheus' own evaluation time: no clock skew between this host and it.
            age = evaluated_at - sampled_at[uuid] if uuid in sampled_at else math.inf
            samples.append(
                GpuSample(
                    index=int(gpu) if gpu.isdigit() else None,
                    uuid=uuid,
                    pci_bus_id=labels.get("pci_bus_id", ""),
                    used_bytes=int(value),
                    age_seconds=max(0.0, age),
                    holders=tuple(sorted(holders.get(uuid, []), key=lambda h: -h.used_bytes)),
                )
            )
        return samples


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
    if name == "gpu_residency_unattributed_memory_bytes":
        return Holder("unattributed", "", value)
    return None
