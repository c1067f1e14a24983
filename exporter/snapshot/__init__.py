"""One snapshot per collection: NVML's reading, the resolved engines and /proc, attributed to
processes, engines and other holders (attribution.py), built at most once per tick or scrape and
shared by every consumer (shared.py): the collectors, the JSON API, the exit watcher and the
sleep/wake transitions all read the same one. It may import sources, engines and the base
modules; everything that consumes a snapshot sits above it."""
