"""The prometheus_client Collector and its concerns: one fresh set of families per scrape from
the shared snapshot, each `--collector.NAME` concern collected in isolation (its own success
gauge and flag). It may import everything below it (pollers, sleep_wake, exits, snapshot,
engines, sources, base), never web or the CLI."""
