"""Writes the Grafana dashboards with grafana-foundation-sdk (Grafana's own typed builders):

    python dashboards/generate.py              # dashboards/gpu-residency.json, dashboards/gpu-residency-fleet.json
    python dashboards/generate.py --out DIR    # the same files into DIR

- gpu-residency: one node in detail: who holds each GPU, engines, sleep/wake, exits.
- gpu-residency-fleet: every node at once, read from the recording rules (rules.yaml) so a refresh
  stays fast at a thousand nodes; each panel links to the node dashboard for the node it shows.

Kept as code so panels stay consistent (one datasource, the same variables everywhere); a test
checks the committed JSON is what this writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    GridPos,
    VariableOption,
    VariableRefresh,
)

HERE = Path(__file__).resolve().parent
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
NODE_DASHBOARD = "/d/gpu-residency/gpu-residency"
TO_NODE = f"{NODE_DASHBOARD}?var-node=${{__field.labels.node}}&${{__url_time_range}}"
sel_gpu = 'node=~"$node", gpu=~"$gpu"'


def queries(*targets: tuple[str, str]) -> list[prometheus.Dataquery]:
    return [
        prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(65 + index)).datasource(DS)
        for index, (expr, legend) in enumerate(targets)
    ]


def series(title: str, grid: tuple[int, int, int, int], *targets: tuple[str, str], unit: str = "bytes",
           desc: str = "", stack: bool = False, bars: bool = False, to_node: bool = False) -> timeseries.Panel:  # fmt: skip
    """A time-series panel; `to_node`: each series links to the node dashboard for its node."""
    h, w, x, y = grid
    panel = (
        timeseries.Panel()
        .title(title)
        .description(desc)
        .datasource(DS)
        .grid_pos(GridPos(h=h, w=w, x=x, y=y))
        .unit(unit)
        .targets(queries(*targets))
        .stacking(
            common_builders.StackingConfig()
            .mode(common.StackingMode.NORMAL if stack else common.StackingMode.NONE)
            .group("A")
        )
        .fill_opacity(80 if bars else 40 if stack else 10)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        )
        .tooltip(
            common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)
        )
    )
    if bars:
        panel = panel.draw_style(common.GraphDrawStyle.BARS)
    if to_node:
        panel = panel.data_links([dashboard.DashboardLink("Node ${__field.labels.node}").url(TO_NODE)])
    return panel


def stat_panel(title: str, grid: tuple[int, int, int, int], *targets: tuple[str, str], unit: str = "short",
               desc: str = "") -> stat.Panel:  # fmt: skip
    h, w, x, y = grid
    return (
        stat.Panel()
        .title(title)
        .description(desc)
        .datasource(DS)
        .grid_pos(GridPos(h=h, w=w, x=x, y=y))
        .unit(unit)
        .targets(queries(*targets))
    )


def variable(name: str, label: str, query: str, many: bool = True) -> dashboard.QueryVariable:
    """A query variable; `many`: several values or All may be chosen (else exactly one)."""
    return (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(DS)
        .query(query)
        .multi(many)
        .include_all(many)
        .all_value(".*")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
    )


def datasource_variable() -> dashboard.DatasourceVariable:
    return dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")


def node_dashboard() -> dashboard.Dashboard:
    board = (
        dashboard.Dashboard("GPU residency")
        .uid("gpu-residency")
        .tags(["gpu", "sglang", "vllm", "rl"])
        .timezone("browser")
        .refresh("10s")
        .time("now-1h", "now")
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .link(dashboard.DashboardLink("Fleet").url("/d/gpu-residency-fleet/gpu-residency-fleet").keep_time(True))
        .with_variable(datasource_variable())
        # One node at a time: every node at once is the fleet dashboard's job (8,000 GPU series
        # at a thousand nodes draw nothing a person can read).
        .with_variable(variable("node", "Node", "label_values(gpu_residency_memory_used_bytes, node)", many=False))
        .with_variable(variable("gpu", "GPU", 'label_values(gpu_residency_memory_used_bytes{node=~"$node"}, gpu)'))
        .with_variable(variable("engine", "Engine", 'label_values(gpu_residency_engine_up{node=~"$node"}, engine)'))
        .with_variable(
            dashboard.CustomVariable("threshold_gib")
            .label("Gate threshold (GiB)")
            .values("2,1,4,7,10")
            .current(VariableOption(selected=True, text="2", value="2"))
        )
    )
    for panel in [
        series(
            "Used vs gate threshold, per GPU", (9, 12, 0, 0),
            (f"gpu_residency_memory_used_bytes{{{sel_gpu}}}", "{{node}} GPU {{gpu}}"),
            (f"max(gpu_residency_memory_total_bytes{{{sel_gpu}}}) * 0 + $threshold_gib * 1024 * 1024 * 1024", "gate threshold"),
            desc="Whole-GPU used memory from NVML: the only honest wake-up signal (it counts every co-tenant). A wake-up onto a GPU is safe when its line is under the threshold.",
        ),
        series(
            "Who holds the memory (stacked)", (9, 12, 12, 0),
            (f"sum by (kind, holder) (gpu_residency_holder_memory_bytes{{{sel_gpu}}})", "{{kind}} {{holder}}"),
            (f"sum(gpu_residency_unattributed_memory_bytes{{{sel_gpu}}})", "unattributed"),
            stack=True,
            desc="Every holder, registered or not: engines (their whole process trees), Ray actors by class, torchrun/Megatron launchers, vLLM/SGLang workers by title, other processes by comm; and memory no listed process accounts for (high: usually a missing hostPID).",
        ),
        series(
            "SGLang accounting vs measured residency, per engine", (9, 12, 0, 9),
            ('sum by (engine) (gpu_residency_sglang_memory_bytes{node=~"$node", engine=~"$engine"})', "{{engine}} SGLang says (start-up accounting)"),
            ('sum by (engine) (gpu_residency_engine_memory_bytes{node=~"$node", engine=~"$engine"})', "{{engine}} measured (process tree, NVML)"),
            desc="SGLang's /server_info numbers are measured once at start-up: a slept engine still reports its pools. The measured line is what it really holds now.",
        ),
        series(
            "Engine exits by cause", (9, 12, 12, 9),
            ('sum by (engine, exit_code, signal, cause) (increase(gpu_residency_engine_exits_total{node=~"$node", engine=~"$engine"}[$__rate_interval]))', "{{engine}} {{cause}} (exit {{exit_code}} {{signal}})"),
            unit="short", bars=True,
            desc="cause, from the exporter's crash forensics: oom_kill (kernel OOM killer), child_failure (a process of the tree failed first), exit_code (it exited by itself), unknown (a signal, or no report, with no evidence of why). `gpu-residency-exporter exits` shows the evidence.",
        ),
        series(
            "Engine state (framework-set or observed) and residency by state", (9, 12, 0, 18),
            ('node_engine_state:gpu_residency_engine_memory_bytes:sum{node=~"$node", engine=~"$engine"}', "{{engine}} ({{state}}, {{source}})"),
            desc="What each engine holds, labelled with its state: an engine asleep should hold under the release floor. source=observed: the engine reported the state itself (vLLM); framework: its framework set it. From the recording rule node_engine_state:gpu_residency_engine_memory_bytes:sum.",
        ),
        series(
            "Release and wake latency (p95)", (9, 12, 12, 18),
            ('max by (engine) (node_engine:gpu_residency_engine_release_seconds:p95_rate5m{node=~"$node", engine=~"$engine"})', "{{engine}} release p95"),
            ('max by (engine) (node_engine:gpu_residency_engine_wake_seconds:p95_rate5m{node=~"$node", engine=~"$engine"})', "{{engine}} wake p95"),
            ('sum by (engine) (increase(gpu_residency_engine_release_timeouts_total{node=~"$node", engine=~"$engine"}[$__rate_interval]))', "{{engine}} release timeouts"),
            unit="s",
            desc="From an engine marked (or seen) asleep until its memory was really gone, and from active until it was back: p95 over 5 minutes, from the recording rules.",
        ),
        series(
            "Memory per holder kind", (9, 12, 0, 27),
            ('sum by (kind) (node_kind:gpu_residency_holder_memory_bytes:sum{node=~"$node"})', "{{kind}}"),
            stack=True,
            desc="trainer (Ray actors named *Train*, torchrun, Megatron), sglang, vllm, ray (other Ray workers), process (anything else), and registered engines by their kind.",
        ),
        series(
            "Memory per Kubernetes pod", (9, 12, 12, 27),
            (f'sum by (namespace, pod) (sum by (pod_uid) (gpu_residency_holder_memory_bytes{{{sel_gpu}, pod_uid!=""}}) * on (pod_uid) group_left (namespace, pod) label_replace(kube_pod_info, "pod_uid", "$1", "uid", "(.+)"))', "{{namespace}}/{{pod}}"),
            stack=True,
            desc="GPU memory per pod, from each process's cgroup path (pod UID) joined with kube-state-metrics' kube_pod_info; empty without kube-state-metrics in the same Prometheus.",
        ),
        stat_panel(
            "Engines up", (5, 12, 0, 36),
            ('gpu_residency_engine_up{node=~"$node", engine=~"$engine"}', "{{engine}}"),
            ('gpu_residency_sglang_up{node=~"$node", engine=~"$engine"}', "{{engine}} /server_info"),
            ('gpu_residency_vllm_up{node=~"$node", engine=~"$engine"}', "{{engine}} vLLM /metrics"),
            unit="bool_on_off",
        ),
        series(
            "Exporter health", (5, 12, 12, 36),
            ('gpu_residency_nvml_up{node=~"$node"}', "{{node}} NVML up"),
            ('gpu_residency_scrape_duration_seconds{node=~"$node"}', "{{node}} collection seconds"),
            ('sum by (node, source, reason) (rate(gpu_residency_errors_total{node=~"$node"}[$__rate_interval])) or sum by (node) (0 * gpu_residency_nvml_up{node=~"$node"})', "{{node}} errors/s {{source}} {{reason}}"),
            unit="short",
        ),
        series(
            "vLLM sleep level and state mismatches", (8, 8, 0, 41),
            ('gpu_residency_vllm_sleep_level{node=~"$node", engine=~"$engine"}', "{{engine}} sleep level"),
            ('gpu_residency_engine_state_mismatch{node=~"$node", engine=~"$engine"}', "{{engine}} mismatch (framework {{framework}}, engine {{observed}})"),
            unit="short",
            desc="While a vLLM engine reports itself asleep: level 1 (weights offloaded to CPU memory) or 2 (discarded) free the GPU alike; 0 (paused, or only the KV cache released) keeps the weights there. Mismatch 1: the framework's state and the engine's own have disagreed past the grace period (framework active, engine asleep: never woken; framework asleep, engine awake: its memory is still held).",
        ),
        series(
            "vLLM KV cache usage (engine accounting)", (8, 8, 8, 41),
            ('gpu_residency_vllm_kv_cache_usage_ratio{node=~"$node", engine=~"$engine"}', "{{engine}} DP {{dp_rank}}"),
            unit="percentunit",
            desc="vLLM's own share of KV cache blocks in use (vllm:kv_cache_usage_perc): engine accounting, not residency; a sleeping engine's KV cache is gone from the GPU whatever this says.",
        ),
        stat_panel(
            "vLLM KV cache capacity (engine accounting)", (8, 8, 16, 41),
            ('gpu_residency_vllm_kv_cache_capacity_tokens{node=~"$node", engine=~"$engine"}', "{{engine}} DP {{dp_rank}} tokens"),
            ('gpu_residency_vllm_kv_cache_capacity_blocks{node=~"$node", engine=~"$engine"}', "{{engine}} DP {{dp_rank}} blocks"),
            desc="The configured KV cache, from vllm:cache_config_info: tokens (vLLM 0.24+, right for hybrid models) and GPU blocks (summed over DP engines by vLLM). Engine accounting, not residency.",
        ),
    ]:  # fmt: skip
        board = board.with_panel(panel)
    return board


def fleet_dashboard() -> dashboard.Dashboard:
    board = (
        dashboard.Dashboard("GPU residency: fleet")
        .uid("gpu-residency-fleet")
        .tags(["gpu", "sglang", "vllm", "rl", "fleet"])
        .timezone("browser")
        .refresh("1m")
        .time("now-1h", "now")
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .link(dashboard.DashboardLink("Node detail").url(NODE_DASHBOARD).keep_time(True))
        .with_variable(datasource_variable())
        .with_variable(
            dashboard.CustomVariable("top")
            .label("Top N")
            .values("10,20,50")
            .current(VariableOption(selected=True, text="10", value="10"))
        )
    )
    for panel in [
        series(
            "Top nodes by memory outside engines", (9, 12, 0, 0),
            ("topk($top, node:gpu_residency_residual_outside_engines_bytes:sum)", "{{node}}"),
            to_node=True,
            desc="Used minus what engines hold, summed over each node's GPUs: trainers, orphans and unlisted memory. Click a series for its node.",
        ),
        series(
            "Top GPUs by memory nobody accounts for", (9, 12, 12, 0),
            ("topk($top, node_gpu:gpu_residency_residual_unclaimed_bytes:sum)", "{{node}} GPU {{gpu}}"),
            to_node=True,
            desc="Used minus every recognised holder (engines, trainers, Ray actors, titled workers): orphans and leaked contexts, what GpuResidualMemoryHigh alerts on.",
        ),
        series(
            "Engines asleep still holding memory", (9, 12, 0, 9),
            ('topk($top, node_engine_state:gpu_residency_engine_memory_bytes:sum{state="asleep"})', "{{node}} {{engine}} ({{source}})"),
            to_node=True,
            desc="What engines marked (or seen) asleep hold across the fleet, the largest first: above the release floor (--engines.release-floor-gb, 2 GiB by default) the release did not free the GPU.",
        ),
        series(
            "Engine exits by cause, fleet", (9, 12, 12, 9),
            ("sum by (cause) (increase(gpu_residency_engine_exits_total[$__rate_interval]))", "{{cause}}"),
            unit="short", bars=True, stack=True,
            desc="oom_kill, child_failure, exit_code, unknown: from the exporters' crash forensics.",
        ),
        series(
            "Release latency by engine (p95, fleet)", (9, 12, 0, 18),
            ("engine:gpu_residency_engine_release_seconds:p95_rate5m", "{{engine}} release p95"),
            ("topk($top, node_engine:gpu_residency_engine_release_seconds:p95_rate5m)", "{{node}} {{engine}} release p95"),
            unit="s", to_node=True,
            desc="Per engine name over the fleet, and the slowest node/engine pairs: from an engine marked asleep until its memory was really gone.",
        ),
        series(
            "Fleet memory by holder kind", (9, 12, 12, 18),
            ("sum by (kind) (node_kind:gpu_residency_holder_memory_bytes:sum)", "{{kind}}"),
            stack=True,
            desc="Every node's GPU memory by who holds it: trainer, sglang, vllm, ray, process, engine kinds.",
        ),
        stat_panel(
            "Nodes", (5, 24, 0, 27),
            ("count(gpu_residency_nvml_up == 1)", "NVML up"),
            ("count(gpu_residency_nvml_up == 0) or vector(0)", "NVML down"),
            ("count(node:gpu_residency_engine_up:sum > 0)", "with live engines"),
        ),
    ]:  # fmt: skip
        board = board.with_panel(panel)
    return board


def write(out: Path) -> list[Path]:
    encoder = JSONEncoder(sort_keys=True, indent=2)
    written = []
    for name, board in (("gpu-residency.json", node_dashboard()), ("gpu-residency-fleet.json", fleet_dashboard())):
        path = out / name
        path.write_text(encoder.encode(board.build()) + "\n")
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write into (default: dashboards/)")
    args = parser.parse_args()
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
