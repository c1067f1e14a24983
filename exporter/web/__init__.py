"""The HTTP side: the keep-alive server, TLS and basic auth (the exporter-toolkit web-config
format), the exposition format, rate-limited logging of client-caused events, and the routes
beside /metrics (the JSON API for gates, its long poll, the exits API). It may import the
collectors and everything below them, never the CLI."""
