"""What engines say about themselves over HTTP, polled in the background so a scrape never waits
on an engine: one bounded fetch, the policy of which URLs may be asked, the shared poller loop,
and one client per engine kind (SGLang accounting, vLLM sleep state and KV cache). It may import
sleep_wake (to report observed states), the snapshot, engines, sources and the base modules."""
