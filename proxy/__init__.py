"""The gateway: upstreams, models, routes, and the lean async proxy hot path."""
