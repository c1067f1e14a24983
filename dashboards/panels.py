"""What the two dashboards show, as data: each panel's title, queries and options, row by row
(generate.py builds and lays them out). Node-dashboard queries are scoped to one cluster and node,
fleet queries to the chosen clusters, whose name every fleet legend carries. Raw series are read
through `max without (replica)`, as the rules read them: against a store that keeps both members
of an HA pair (a remote_write receiver) nothing is drawn or summed twice."""

from __future__ import annotations

from dataclasses import dataclass

# Label matchers of the node dashboard: one node of one cluster (node names repeat across clusters).
sel_node = 'cluster=~"$cluster", node=~"$node"'
sel_gpu = f'{sel_node}, gpu=~"$gpu"'


@dataclass(frozen=True)
class Panel:
    """One panel as data. `kind`: "series" (time series), "stat" or "xy" (an XY chart: every
    query joined on time, the field whose legend is `x` across, the others up); `targets`:
    (expr, legend) pairs; `to_node`: each series links to the node dashboard for its cluster and
    node; `repeat`: one copy per value of that variable."""

    title: str
    targets: tuple[tuple[str, str], ...]
    kind: str = "series"
    unit: str = "bytes"
    desc: str = ""
    stack: bool = False
    bars: bool = False
    to_node: bool = False
    width: int = 12
    x: str = ""
    repeat: str = ""


def series(title: str, *targets: tuple[str, str], **options) -> Panel:
    return Panel(title, targets, **options)


def stat_panel(title: str, *targets: tuple[str, str], **options) -> Panel:
    return Panel(title, targets, kind="stat", **{"unit": "short", **options})


NODE_PANELS = [
    (9, [
        series(
            "Used vs gate threshold, per GPU",
            (f"max without (replica) (gpu_residency_memory_used_bytes{{{sel_gpu}}})", "{{node}} GPU {{gpu}}"),
            (f"max(gpu_residency_memory_total_bytes{{{sel_gpu}}}) * 0 + $threshold_gib * 1024 * 1024 * 1024", "gate threshold"),
            desc="Whole-GPU used memory from NVML: the only honest wake-up signal (it counts every co-tenant). A wake-up onto a GPU is safe when its line is under the threshold.",
        ),
        series(
            "Who holds the memory (stacked)",
            (f"sum by (kind, holder) (max without (replica) (gpu_residency_holder_memory_bytes{{{sel_gpu}}}))", "{{kind}} {{holder}}"),
            (f"sum(max without (replica) (gpu_residency_unattributed_memory_bytes{{{sel_gpu}}}))", "unattributed"),
            stack=True,
            desc="Every holder, registered or not: engines (their whole process trees), Ray actors by class, torchrun/Megatron launchers, vLLM/SGLang workers by title, other processes by comm; and memory no listed process accounts for (high: usually a missing hostPID).",
        ),
    ]),
    (9, [
        series(
            "SGLang accounting vs measured residency, per engine",
            ('sum by (engine) (max without (replica) (gpu_residency_sglang_memory_bytes{cluster=~"$cluster", node=~"$node", engine=~"$engine"}))', "{{engine}} SGLang says (start-up accounting)"),
            ('sum by (engine) (max without (replica) (gpu_residency_engine_memory_bytes{cluster=~"$cluster", node=~"$node", engine=~"$engine"}))', "{{engine}} measured (process tree, NVML)"),
            desc="SGLang's /server_info numbers are measured once at start-up: a slept engine still reports its pools. The measured line is what it really holds now.",
        ),
        series(
            "Engine exits by cause",
            ('sum by (engine, exit_code, signal, cause) (max without (replica) (increase(gpu_residency_engine_exits_total{cluster=~"$cluster", node=~"$node", engine=~"$engine"}[$__rate_interval])))', "{{engine}} {{cause}} (exit {{exit_code}} {{signal}})"),
            unit="short", bars=True,
            desc="cause, from the exporter's crash forensics: oom_kill (kernel OOM killer), child_failure (a process of the tree failed first), exit_code (it exited by itself), unknown (a signal, or no report, with no evidence of why). `gpu-residency-exporter exits` shows the evidence.",
        ),
    ]),
    (9, [
        series(
            "Engine state (framework-set or observed) and residency by state",
            ('node_engine_state:gpu_residency_engine_memory_bytes:sum{cluster=~"$cluster", node=~"$node", engine=~"$engine"}', "{{engine}} ({{state}}, {{source}})"),
            desc="What each engine holds, labelled with its state: an engine asleep should hold under the release floor. source=observed: the engine reported the state itself (vLLM); framework: its framework set it. From the recording rule node_engine_state:gpu_residency_engine_memory_bytes:sum.",
        ),
        series(
            "Release and wake latency (p95)",
            ('max by (engine) (node_engine:gpu_residency_engine_release_seconds:p95_rate5m{cluster=~"$cluster", node=~"$node", engine=~"$engine"})', "{{engine}} release p95"),
            ('max by (engine) (node_engine:gpu_residency_engine_wake_seconds:p95_rate5m{cluster=~"$cluster", node=~"$node", engine=~"$engine"})', "{{engine}} wake p95"),
            ('sum by (engine) (max without (replica) (increase(gpu_residency_engine_release_timeouts_total{cluster=~"$cluster", node=~"$node", engine=~"$engine"}[$__rate_interval])))', "{{engine}} release timeouts"),
            unit="s",
            desc="From an engine marked (or seen) asleep until its memory was really gone, and from active until it was back: p95 over 5 minutes, from the recording rules.",
        ),
    ]),
    (9, [
        series(
            "Memory per holder kind",
            ('sum by (kind) (node_kind:gpu_residency_holder_memory_bytes:sum{cluster=~"$cluster", node=~"$node"})', "{{kind}}"),
            stack=True,
            desc="trainer (Ray actors named *Train*, torchrun, Megatron), sglang, vllm, ray (other Ray workers), process (anything else), and registered engines by their kind.",
        ),
        series(
            "Memory per Kubernetes pod",
            (f'sum by (namespace, pod) (sum by (pod_uid) (max without (replica) (gpu_residency_holder_memory_bytes{{{sel_gpu}, pod_uid!=""}})) * on (pod_uid) group_left (namespace, pod) label_replace(kube_pod_info, "pod_uid", "$1", "uid", "(.+)"))', "{{namespace}}/{{pod}}"),
            stack=True,
            desc="GPU memory per pod, from each process's cgroup path (pod UID) joined with kube-state-metrics' kube_pod_info; empty without kube-state-metrics in the same Prometheus.",
        ),
    ]),
    (9, [
        Panel(
            "Residual after each release, against the cycle number: $engine",
            (
                ('max without (replica) (gpu_residency_engine_release_cycles_total{cluster=~"$cluster", node=~"$node", engine=~"$engine"})', "cycle"),
                ('max without (replica) (gpu_residency_engine_release_residual_bytes{cluster=~"$cluster", node=~"$node", engine=~"$engine"})', "GPU {{gpu}}"),
                ('max without (replica) (gpu_residency_engine_release_floor_bytes{cluster=~"$cluster", node=~"$node"})', "release floor"),
            ),
            kind="xy", x="cycle", repeat="engine", width=24,
            desc="One chart per engine: what its process tree still held on each GPU when a release completed (a cycle), against the cycle number, and the release floor. A line that climbs towards the floor is residual creep (GpuEngineResidualCreeping); the exporter fits the slope over the last --engines.residual-window cycles. Each point is a scrape, so a cycle shorter than the scrape interval is drawn only by its neighbours.",
        ),
    ]),
    (5, [
        stat_panel(
            "Engines up",
            ('max without (replica) (gpu_residency_engine_up{cluster=~"$cluster", node=~"$node", engine=~"$engine"})', "{{engine}}"),
            ('max without (replica) (gpu_residency_sglang_up{cluster=~"$cluster", node=~"$node", engine=~"$engine"})', "{{engine}} /server_info"),
            ('max without (replica) (gpu_residency_vllm_up{cluster=~"$cluster", node=~"$node", engine=~"$engine"})', "{{engine}} vLLM /metrics"),
            unit="bool_on_off",
        ),
        series(
            "Exporter health",
            ('max without (replica) (gpu_residency_nvml_up{cluster=~"$cluster", node=~"$node"})', "{{node}} NVML up"),
            ('max without (replica) (gpu_residency_scrape_duration_seconds{cluster=~"$cluster", node=~"$node"})', "{{node}} collection seconds"),
            ('sum by (node, source, reason) (max without (replica) (rate(gpu_residency_errors_total{cluster=~"$cluster", node=~"$node"}[$__rate_interval]))) or sum by (node) (0 * max without (replica) (gpu_residency_nvml_up{cluster=~"$cluster", node=~"$node"}))', "{{node}} errors/s {{source}} {{reason}}"),
            unit="short",
        ),
    ]),
    (8, [
        series(
            "vLLM sleep level and state mismatches",
            ('max without (replica) (gpu_residency_vllm_sleep_level{cluster=~"$cluster", node=~"$node", engine=~"$engine"})', "{{engine}} sleep level"),
            ('max without (replica) (gpu_residency_engine_state_mismatch{cluster=~"$cluster", node=~"$node", engine=~"$engine"})', "{{engine}} mismatch (framework {{framework}}, engine {{observed}})"),
            unit="short",
            desc="While a vLLM engine reports itself asleep: level 1 (weights offloaded to CPU memory) or 2 (discarded) free the GPU alike; 0 (paused, or only the KV cache released) keeps the weights there. Mismatch 1: the framework's state and the engine's own have disagreed past the grace period (framework active, engine asleep: never woken; framework asleep, engine awake: its memory is still held).",
            width=8,
        ),
        series(
            "vLLM KV cache usage (engine accounting)",
            ('max without (replica) (gpu_residency_vllm_kv_cache_usage_ratio{cluster=~"$cluster", node=~"$node", engine=~"$engine"})', "{{engine}} DP {{dp_rank}}"),
            unit="percentunit",
            desc="vLLM's own share of KV cache blocks in use (vllm:kv_cache_usage_perc): engine accounting, not residency; a sleeping engine's KV cache is gone from the GPU whatever this says.",
            width=8,
        ),
        stat_panel(
            "vLLM KV cache capacity (engine accounting)",
            ('max without (replica) (gpu_residency_vllm_kv_cache_capacity_tokens{cluster=~"$cluster", node=~"$node", engine=~"$engine"})', "{{engine}} DP {{dp_rank}} tokens"),
            ('max without (replica) (gpu_residency_vllm_kv_cache_capacity_blocks{cluster=~"$cluster", node=~"$node", engine=~"$engine"})', "{{engine}} DP {{dp_rank}} blocks"),
            desc="The configured KV cache, from vllm:cache_config_info: tokens (vLLM 0.24+, right for hybrid models) and GPU blocks (summed over DP engines by vLLM). Engine accounting, not residency.",
            width=8,
        ),
    ]),
]  # fmt: skip

FLEET_PANELS = [
    (9, [
        series(
            "Top nodes by memory outside engines",
            ('topk($top, node:gpu_residency_residual_outside_engines_bytes:sum{cluster=~"$cluster"})', "{{cluster}} {{node}}"),
            to_node=True,
            desc="Used minus what engines hold, summed over each node's GPUs: trainers, orphans and unlisted memory. Click a series for its node.",
        ),
        series(
            "Top GPUs by memory nobody accounts for",
            ('topk($top, max without (replica) (gpu_residency_residual_unclaimed_bytes{cluster=~"$cluster"}))', "{{cluster}} {{node}} GPU {{gpu}}"),
            to_node=True,
            desc="Used minus every recognised holder (engines, trainers, Ray actors, titled workers): orphans and leaked contexts, what GpuResidualMemoryHigh alerts on.",
        ),
    ]),
    (9, [
        series(
            "Engines asleep still holding memory",
            ('topk($top, node_engine_state:gpu_residency_engine_memory_bytes:sum{cluster=~"$cluster", state="asleep"})', "{{cluster}} {{node}} {{engine}} ({{source}})"),
            to_node=True,
            desc="What engines marked (or seen) asleep hold across the fleet, the largest first: above the release floor (--engines.release-floor-gb, 2 GiB by default) the release did not free the GPU.",
        ),
        series(
            "Engine exits by cause, fleet",
            ('sum by (cluster, cause) (max without (replica) (increase(gpu_residency_engine_exits_total{cluster=~"$cluster"}[$__rate_interval])))', "{{cluster}} {{cause}}"),
            unit="short", bars=True, stack=True,
            desc="oom_kill, child_failure, exit_code, unknown: from the exporters' crash forensics.",
        ),
    ]),
    (9, [
        series(
            "Release latency by engine (p95, fleet)",
            ('engine:gpu_residency_engine_release_seconds:p95_rate5m{cluster=~"$cluster"}', "{{cluster}} {{engine}} release p95"),
            ('topk($top, node_engine:gpu_residency_engine_release_seconds:p95_rate5m{cluster=~"$cluster"})', "{{cluster}} {{node}} {{engine}} release p95"),
            unit="s", to_node=True,
            desc="Per engine name over each cluster's nodes, and the slowest node/engine pairs: from an engine marked asleep until its memory was really gone.",
        ),
        series(
            "Fleet memory by holder kind",
            ('sum by (cluster, kind) (node_kind:gpu_residency_holder_memory_bytes:sum{cluster=~"$cluster"})', "{{cluster}} {{kind}}"),
            stack=True,
            desc="Every node's GPU memory by who holds it: trainer, sglang, vllm, ray, process, engine kinds.",
        ),
    ]),
    (5, [
        stat_panel(
            "Nodes",
            ('count by (cluster) (max by (cluster, node) (gpu_residency_nvml_up{cluster=~"$cluster"}) == 1)', "{{cluster}} NVML up"),
            ('count by (cluster) (max by (cluster, node) (gpu_residency_nvml_up{cluster=~"$cluster"}) == 0) or vector(0)', "{{cluster}} NVML down"),
            ('count by (cluster) (node:gpu_residency_engine_up:sum{cluster=~"$cluster"} > 0)', "{{cluster}} with live engines"),
            width=24,
        ),
    ]),
]  # fmt: skip

# MIG (issue 29): the GPUs' MIG devices, empty where MIG is off. A MIG device is named by its GPU,
# its GPU/compute instance ids (mig_instance) and profile; the parent GPU's panels above still
# show the whole card, which the devices' figures sum to. Node dashboard only: the fleet's reads
# recording rules, and per-device series (up to 56 a node) are not worth one at fleet scale.
NODE_PANELS.append(
    (8, [
        series(
            "MIG devices: used vs size",
            (f"max without (replica) (gpu_residency_mig_memory_used_bytes{{{sel_gpu}}})", "GPU {{gpu}} MIG {{mig_instance}} {{mig_profile}} used"),
            (f"max without (replica) (gpu_residency_mig_memory_total_bytes{{{sel_gpu}}})", "GPU {{gpu}} MIG {{mig_instance}} {{mig_profile}} size"),
            desc="Each MIG device's used memory (NVML, on the device) against its size: a wake-up onto a MIG slice waits on that slice's line (the gate takes MIG-... UUIDs and gpu:gi). Empty where MIG is off.",
        ),
        series(
            "MIG devices: who holds them (stacked)",
            (f'sum by (gpu, mig_instance, holder) (max without (replica) (gpu_residency_process_memory_bytes{{{sel_gpu}, mig_instance!=""}}))', "GPU {{gpu}} MIG {{mig_instance}} {{holder}}"),
            (f"max without (replica) (gpu_residency_mig_unattributed_memory_bytes{{{sel_gpu}}})", "GPU {{gpu}} MIG {{mig_instance}} unattributed"),
            stack=True,
            desc="The processes NVML places on each MIG device, by holder (an engine's processes under its name), and what no listed process accounts for on it: processes hidden from the host (some vGPU setups) or PIDs the exporter cannot see. See the runbook's GpuMigUnattributedMemoryHigh.",
        ),
    ])
)  # fmt: skip
