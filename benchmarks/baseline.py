"""What frameworks do today, as an exporter, to compare against: for every engine, walk the
whole process table for its children and take a fresh NVML reading.

    python -m benchmarks.baseline --port 9999 --registry DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import psutil
import pynvml
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily


class TodaysProbe:
    def __init__(self, registry: Path) -> None:
        self._registry = registry

    def collect(self):
        used = GaugeMetricFamily("baseline_engine_memory_bytes", "per engine, per GPU", labels=["engine", "gpu"])
        for path in sorted(self._registry.glob("*.json")):
            entry = json.loads(path.read_text())
            try:
                root = psutil.Process(entry["root_pid"])
                pids = {root.pid} | {child.pid for child in root.children(recursive=True)}  # whole-table walk
            except psutil.Error:
                continue
            pynvml.nvmlInit()  # a fresh query, as a subprocess to nvidia-smi would be
            try:
                for index in range(pynvml.nvmlDeviceGetCount()):
                    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                    pynvml.nvmlDeviceGetMemoryInfo(handle)
                    total = sum(
                        p.usedGpuMemory or 0
                        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                        if p.pid in pids
                    )
                    used.add_metric([entry["name"], str(index)], total)
            finally:
                pynvml.nvmlShutdown()
        yield used


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--registry", type=Path, required=True)
    args = parser.parse_args()
    registry = CollectorRegistry()
    registry.register(TodaysProbe(args.registry))
    start_http_server(args.port, addr="127.0.0.1", registry=registry)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    raise SystemExit(main())
