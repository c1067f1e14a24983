"""Writes gpu-residency.json, the Grafana dashboard: python dashboards/generate.py > dashboards/gpu-residency.json

Kept as code so panels stay consistent (one datasource, the same variables everywhere);
a test checks the committed JSON is what this prints.
"""

import json

DS = {"type": "prometheus", "uid": "${datasource}"}


def target(expr, legend, ref):
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}


panels = []


def panel(title, kind, targets, grid, unit="bytes", desc="", stack=False, extra=None):
    p = {
        "id": len(panels) + 1,
        "title": title,
        "type": kind,
        "datasource": DS,
        "description": desc,
        "gridPos": grid,
        "targets": [target(expr, legend, chr(65 + i)) for i, (expr, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "fillOpacity": 40 if stack else 10,
        }
        p["options"] = {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi"},
        }
    if extra:
        p.update(extra)
    panels.append(p)


sel_gpu = 'node=~"$node", gpu=~"$gpu"'
panel(
    "Used vs gate threshold, per GPU",
    "timeseries",
    [
        (f"gpu_residency_memory_used_bytes{{{sel_gpu}}}", "{{node}} GPU {{gpu}}"),
        (
            f"max(gpu_residency_memory_total_bytes{{{sel_gpu}}}) * 0 + $threshold_gib * 1024 * 1024 * 1024",
            "gate threshold",
        ),
    ],
    {"h": 9, "w": 12, "x": 0, "y": 0},
    desc="Whole-GPU used memory from NVML: the only honest wake-up signal (it counts every co-tenant). A wake-up onto a GPU is safe when its line is under the threshold.",
)
panel(
    "Who holds the memory (stacked)",
    "timeseries",
    [
        (f"sum by (kind, holder) (gpu_residency_holder_memory_bytes{{{sel_gpu}}})", "{{kind}} {{holder}}"),
        (f"sum(gpu_residency_unattributed_memory_bytes{{{sel_gpu}}})", "unattributed"),
    ],
    {"h": 9, "w": 12, "x": 12, "y": 0},
    stack=True,
    desc="Every holder, registered or not: engines (their whole process trees), Ray actors by class, torchrun/Megatron launchers, vLLM/SGLang workers by title, other processes by comm; and memory no listed process accounts for (high: usually a missing hostPID).",
)
panel(
    "SGLang accounting vs measured residency, per engine",
    "timeseries",
    [
        (
            'sum by (engine) (gpu_residency_sglang_memory_bytes{node=~"$node", engine=~"$engine"})',
            "{{engine}} SGLang says (start-up accounting)",
        ),
        (
            'sum by (engine) (gpu_residency_engine_memory_bytes{node=~"$node", engine=~"$engine"})',
            "{{engine}} measured (process tree, NVML)",
        ),
    ],
    {"h": 9, "w": 12, "x": 0, "y": 9},
    desc="SGLang's /server_info numbers are measured once at start-up: a slept engine still reports its pools. The measured line is what it really holds now.",
)
panel(
    "Engine exits by cause",
    "timeseries",
    [
        (
            'sum by (engine, exit_code, signal, cause) (increase(gpu_residency_engine_exits_total{node=~"$node", engine=~"$engine"}[$__rate_interval]))',
            "{{engine}} {{cause}} (exit {{exit_code}} {{signal}})",
        ),
    ],
    {"h": 9, "w": 12, "x": 12, "y": 9},
    unit="short",
    desc="cause, from the exporter's crash forensics: oom_kill (kernel OOM killer), child_failure (a process of the tree died first), signal (killed from outside), exit_code, unknown (no report, no evidence). `gpu-residency-exporter exits` shows the evidence.",
    extra={
        "fieldConfig": {
            "defaults": {"unit": "short", "custom": {"drawStyle": "bars", "fillOpacity": 80}},
            "overrides": [],
        }
    },
)
panel(
    "Engine state (framework-set or observed) and residency by state",
    "timeseries",
    [
        (
            'sum by (engine, state, source) (gpu_residency_engine_memory_bytes{node=~"$node", engine=~"$engine"} * on (node, engine) group_left (state, source) (gpu_residency_engine_state{node=~"$node", engine=~"$engine"} == 1))',
            "{{engine}} ({{state}}, {{source}})",
        ),
    ],
    {"h": 9, "w": 12, "x": 0, "y": 18},
    desc="What each engine holds, labelled with its state: an engine asleep should hold under the release floor. source=observed: the engine reported the state itself (vLLM); framework: its framework set it.",
)
panel(
    "Release and wake latency (p95)",
    "timeseries",
    [
        (
            'histogram_quantile(0.95, sum by (le, engine) (rate(gpu_residency_engine_release_seconds_bucket{node=~"$node", engine=~"$engine"}[$__rate_interval])))',
            "{{engine}} release p95",
        ),
        (
            'histogram_quantile(0.95, sum by (le, engine) (rate(gpu_residency_engine_wake_seconds_bucket{node=~"$node", engine=~"$engine"}[$__rate_interval])))',
            "{{engine}} wake p95",
        ),
        (
            'sum by (engine) (increase(gpu_residency_engine_release_timeouts_total{node=~"$node", engine=~"$engine"}[$__rate_interval])) or sum by (engine) (0 * gpu_residency_engine_up{node=~"$node", engine=~"$engine"})',
            "{{engine}} release timeouts",
        ),
    ],
    {"h": 9, "w": 12, "x": 12, "y": 18},
    unit="s",
    desc="From the framework marking an engine asleep (active) until its memory was really gone (back).",
)
panel(
    "Memory per holder kind",
    "timeseries",
    [(f"sum by (kind) (gpu_residency_holder_memory_bytes{{{sel_gpu}}})", "{{kind}}")],
    {"h": 9, "w": 12, "x": 0, "y": 27},
    stack=True,
    desc="trainer (Ray actors named *Train*, torchrun, Megatron), sglang, vllm, ray (other Ray workers), process (anything else), and registered engines by their kind.",
)
panel(
    "Memory per Kubernetes pod",
    "timeseries",
    [
        (
            f'sum by (namespace, pod) (sum by (pod_uid) (gpu_residency_holder_memory_bytes{{{sel_gpu}, pod_uid!=""}}) * on (pod_uid) group_left (namespace, pod) label_replace(kube_pod_info, "pod_uid", "$1", "uid", "(.+)"))',
            "{{namespace}}/{{pod}}",
        )
    ],
    {"h": 9, "w": 12, "x": 12, "y": 27},
    stack=True,
    desc="GPU memory per pod, from each process's cgroup path (pod UID) joined with kube-state-metrics' kube_pod_info; empty without kube-state-metrics in the same Prometheus.",
)
panel(
    "Engines up",
    "stat",
    [
        ('gpu_residency_engine_up{node=~"$node", engine=~"$engine"}', "{{engine}}"),
        ('gpu_residency_sglang_up{node=~"$node", engine=~"$engine"}', "{{engine}} /server_info"),
        ('gpu_residency_vllm_up{node=~"$node", engine=~"$engine"}', "{{engine}} vLLM /metrics"),
    ],
    {"h": 5, "w": 12, "x": 0, "y": 36},
    unit="bool_on_off",
)
panel(
    "Exporter health",
    "timeseries",
    [
        ('gpu_residency_nvml_up{node=~"$node"}', "{{node}} NVML up"),
        ('gpu_residency_scrape_duration_seconds{node=~"$node"}', "{{node}} collection seconds"),
        (
            'sum by (node, source, reason) (rate(gpu_residency_errors_total{node=~"$node"}[$__rate_interval])) or sum by (node) (0 * gpu_residency_nvml_up{node=~"$node"})',
            "{{node}} errors/s {{source}} {{reason}}",
        ),
    ],
    {"h": 5, "w": 12, "x": 12, "y": 36},
    unit="short",
)
panel(
    "vLLM sleep level and state mismatches",
    "timeseries",
    [
        ('gpu_residency_vllm_sleep_level{node=~"$node", engine=~"$engine"}', "{{engine}} sleep level"),
        (
            'gpu_residency_engine_state_mismatch{node=~"$node", engine=~"$engine"}',
            "{{engine}} mismatch (framework {{framework}}, engine {{observed}})",
        ),
    ],
    {"h": 8, "w": 8, "x": 0, "y": 41},
    unit="short",
    desc="While a vLLM engine reports itself asleep: level 1 (weights offloaded to CPU memory) or 2 (discarded) free the GPU alike; 0 (paused, or only the KV cache released) keeps the weights there. Mismatch 1: the framework's state and the engine's own have disagreed past the grace period (framework active, engine asleep: never woken; framework asleep, engine awake: its memory is still held).",
)
panel(
    "vLLM KV cache usage (engine accounting)",
    "timeseries",
    [
        (
            'gpu_residency_vllm_kv_cache_usage_ratio{node=~"$node", engine=~"$engine"}',
            "{{engine}} DP {{dp_rank}}",
        )
    ],
    {"h": 8, "w": 8, "x": 8, "y": 41},
    unit="percentunit",
    desc="vLLM's own share of KV cache blocks in use (vllm:kv_cache_usage_perc): engine accounting, not residency; a sleeping engine's KV cache is gone from the GPU whatever this says.",
)
panel(
    "vLLM KV cache capacity (engine accounting)",
    "stat",
    [
        (
            'gpu_residency_vllm_kv_cache_capacity_tokens{node=~"$node", engine=~"$engine"}',
            "{{engine}} DP {{dp_rank}} tokens",
        ),
        (
            'gpu_residency_vllm_kv_cache_capacity_blocks{node=~"$node", engine=~"$engine"}',
            "{{engine}} DP {{dp_rank}} blocks",
        ),
    ],
    {"h": 8, "w": 8, "x": 16, "y": 41},
    unit="short",
    desc="The configured KV cache, from vllm:cache_config_info: tokens (vLLM 0.24+, right for hybrid models) and GPU blocks (summed over DP engines by vLLM). Engine accounting, not residency.",
)
dash = {
    "title": "GPU residency",
    "uid": "gpu-residency",
    "tags": ["gpu", "sglang", "vllm", "rl"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "refresh": "10s",
    "time": {"from": "now-1h", "to": "now"},
    "editable": True,
    "graphTooltip": 1,
    "templating": {
        "list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source", "current": {}},
            {
                "name": "node",
                "type": "query",
                "datasource": DS,
                "label": "Node",
                "multi": True,
                "includeAll": True,
                "allValue": ".*",
                "refresh": 2,
                "query": {"query": "label_values(gpu_residency_memory_used_bytes, node)", "refId": "node"},
                "definition": "label_values(gpu_residency_memory_used_bytes, node)",
                "current": {},
            },
            {
                "name": "gpu",
                "type": "query",
                "datasource": DS,
                "label": "GPU",
                "multi": True,
                "includeAll": True,
                "allValue": ".*",
                "refresh": 2,
                "query": {"query": 'label_values(gpu_residency_memory_used_bytes{node=~"$node"}, gpu)', "refId": "gpu"},
                "definition": 'label_values(gpu_residency_memory_used_bytes{node=~"$node"}, gpu)',
                "current": {},
            },
            {
                "name": "engine",
                "type": "query",
                "datasource": DS,
                "label": "Engine",
                "multi": True,
                "includeAll": True,
                "allValue": ".*",
                "refresh": 2,
                "query": {"query": 'label_values(gpu_residency_engine_up{node=~"$node"}, engine)', "refId": "engine"},
                "definition": 'label_values(gpu_residency_engine_up{node=~"$node"}, engine)',
                "current": {},
            },
            {
                "name": "threshold_gib",
                "type": "custom",
                "label": "Gate threshold (GiB)",
                "query": "2,1,4,7,10",
                "current": {"text": "2", "value": "2"},
                "options": [],
            },
        ]
    },
    "panels": panels,
}
print(json.dumps(dash, indent=2))
