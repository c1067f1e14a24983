"""Sleep and wake: each engine's state, whoever tells it (its framework through the registry, or
the engine itself through a poller's observation), disagreements between the two, how long a
release or a wake really takes on the GPUs, and the gate's last word per engine. It may import the
snapshot, engines, sources and the base modules; pollers feed it through the StateObserver
protocol, so it never imports them."""
