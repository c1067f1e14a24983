"""Which processes are engines: the registry directory frameworks write (engines/registry.py,
public as exporter.registry), a static config file, auto-discovery by launch command line, and the
catalog that resolves all three against /proc into one list per cycle. It may import sources and
the base modules (exporter.errors, exporter.supervisor), never the snapshot or anything above it."""
