"""gpu-residency exporter: what really holds GPU memory on a node shared by engines and a trainer."""

__version__ = "0.1.0"
