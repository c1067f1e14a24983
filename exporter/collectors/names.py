"""The metric name prefix every family of the exporter shares."""

PREFIX = "gpu_residency_"
