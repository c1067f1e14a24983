"""Low-level pieces the exporter, the gate and the framework helpers share.

Standard library only: the gate and the framework helpers import this inside training
processes (Ray actors, schedulers) that must not pull in prometheus_client or NVML.
"""
