"""Writes the Grafana dashboards with grafana-foundation-sdk (Grafana's own typed builders):

    python dashboards/generate.py              # dashboards/gpu-residency.json, dashboards/gpu-residency-fleet.json
    python dashboards/generate.py --out DIR    # the same files into DIR

- gpu-residency: one node of one cluster in detail: who holds each GPU, engines, sleep/wake, exits.
- gpu-residency-fleet: every node of the chosen clusters at once, read from the recording rules
  (rules.yaml) so a refresh stays fast at a thousand nodes; every legend names the cluster, and
  each series links to the node dashboard for its cluster and node.

Kept as code so panels stay consistent (one datasource, the same variables everywhere): each
panel is a row of data (title, queries, options) built by the one builder of its kind, laid out
row by row; a test checks the committed JSON is what this writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries, xychart
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import xychart as xy
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DataTransformerConfig,
    DynamicConfigValue,
    GridPos,
    VariableOption,
    VariableRefresh,
)
from panels import FLEET_PANELS, NODE_PANELS, Panel, sel_node

HERE = Path(__file__).resolve().parent
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
NODE_DASHBOARD = "/d/gpu-residency/gpu-residency"
TO_NODE = (
    f"{NODE_DASHBOARD}?var-node=${{__field.labels.node}}&var-cluster=${{__field.labels.cluster}}&${{__url_time_range}}"
)


def queries(*targets: tuple[str, str]) -> list[prometheus.Dataquery]:
    return [
        prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(65 + index)).datasource(DS)
        for index, (expr, legend) in enumerate(targets)
    ]


def build_series(spec: Panel) -> timeseries.Panel:
    """A time-series panel: table legend with last and max, every series in the tooltip."""
    panel = (
        timeseries.Panel()
        .stacking(
            common_builders.StackingConfig()
            .mode(common.StackingMode.NORMAL if spec.stack else common.StackingMode.NONE)
            .group("A")
        )
        .fill_opacity(80 if spec.bars else 40 if spec.stack else 10)
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
    if spec.bars:
        panel = panel.draw_style(common.GraphDrawStyle.BARS)
    if spec.to_node:
        link = dashboard.DashboardLink("Node ${__field.labels.cluster}/${__field.labels.node}").url(TO_NODE)
        panel = panel.data_links([link])
    return panel


def build_xy(spec: Panel) -> xychart.Panel:
    """An XY chart: the queries joined on their common timestamps (one scrape's values side by side),
    the field named `spec.x` across and every other one up; one copy per value of `spec.repeat`."""
    panel = (
        xychart.Panel()
        .with_transformation(DataTransformerConfig(id_val="joinByField", options={"byField": "Time", "mode": "outer"}))
        .series_mapping(xy.SeriesMapping.AUTO)
        .dims(xychart.XYDimensionConfig().x(spec.x))
        .show(xy.ScatterShow.POINTS_AND_LINES)
        .override_by_name(spec.x, [DynamicConfigValue(id_val="unit", value="none")])  # a count, not the panel's unit
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    )
    return panel.repeat(spec.repeat).repeat_direction("h") if spec.repeat else panel


BUILDERS = {"series": build_series, "stat": lambda spec: stat.Panel(), "xy": build_xy}


def layout(rows: list[tuple[int, list[Panel]]]) -> list:
    """(height, panels) rows, top to bottom, each row's panels left to right: the built panels."""
    built, y = [], 0
    for height, panels in rows:
        x = 0
        for spec in panels:
            built.append(
                BUILDERS[spec.kind](spec)
                .title(spec.title)
                .description(spec.desc)
                .datasource(DS)
                .grid_pos(GridPos(h=height, w=spec.width, x=x, y=y))
                .unit(spec.unit)
                .targets(queries(*spec.targets))
            )
            x += spec.width
        y += height
    return built


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


def board(title: str, uid: str, tags: list[str], refresh: str, link: dashboard.DashboardLink) -> dashboard.Dashboard:
    """What both dashboards share: time, cursor, the link to the other one (carrying the chosen
    cluster and the time range), the datasource variable."""
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .tags(["gpu", "sglang", "vllm", "rl", *tags])
        .timezone("browser")
        .refresh(refresh)
        .time("now-1h", "now")
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .link(link.keep_time(True).include_vars(True))
        .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )


def custom(name: str, label: str, values: str) -> dashboard.CustomVariable:
    """A fixed list of values; the first is the default."""
    first = values.split(",")[0]
    return (
        dashboard.CustomVariable(name)
        .label(label)
        .values(values)
        .current(VariableOption(selected=True, text=first, value=first))
    )


def node_dashboard() -> dashboard.Dashboard:
    result = (
        board("GPU residency", "gpu-residency", [], "10s",
              dashboard.DashboardLink("Fleet").url("/d/gpu-residency-fleet/gpu-residency-fleet"))
        # One cluster and one node at a time: every node at once is the fleet dashboard's job (8,000
        # GPU series at a thousand nodes draw nothing a person can read). Without a cluster label the
        # cluster has no values and its empty matcher selects the series that have none.
        .with_variable(variable("cluster", "Cluster", "label_values(gpu_residency_memory_used_bytes, cluster)", many=False))
        .with_variable(variable("node", "Node", 'label_values(gpu_residency_memory_used_bytes{cluster=~"$cluster"}, node)', many=False))
        .with_variable(variable("gpu", "GPU", f"label_values(gpu_residency_memory_used_bytes{{{sel_node}}}, gpu)"))
        .with_variable(variable("engine", "Engine", f"label_values(gpu_residency_engine_up{{{sel_node}}}, engine)"))
        .with_variable(custom("threshold_gib", "Gate threshold (GiB)", "2,1,4,7,10"))
    )  # fmt: skip
    for panel in layout(NODE_PANELS):
        result = result.with_panel(panel)
    return result


def fleet_dashboard() -> dashboard.Dashboard:
    result = (
        board("GPU residency: fleet", "gpu-residency-fleet", ["fleet"], "1m",
              dashboard.DashboardLink("Node detail").url(NODE_DASHBOARD))
        .with_variable(variable("cluster", "Cluster", "label_values(gpu_residency_nvml_up, cluster)"))
        .with_variable(custom("top", "Top N", "10,20,50"))
    )  # fmt: skip
    for panel in layout(FLEET_PANELS):
        result = result.with_panel(panel)
    return result


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
