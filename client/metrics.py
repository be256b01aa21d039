"""Prometheus metrics of one trainer rank's teacher client, all defined here."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class ClientMetrics:
    """Per-rank client metrics in `registry` (a fresh one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.wait_seconds = Counter("logitcast_client_wait_seconds",
                                    "Seconds the trainer waited for a step's targets", registry=r)
        self.steps = Counter("logitcast_client_steps", "Steps delivered to the trainer", registry=r)
        self.cache_hits = Counter("logitcast_client_cache_hits", "Rows found in the cache",
                                  registry=r)
        self.cache_misses = Counter("logitcast_client_cache_misses",
                                    "Rows fetched from the fleet", registry=r)
        self.cache_corrupt_records = Counter(
            "logitcast_client_cache_corrupt_records",
            "Damaged cache records treated as misses (online: fetched again; offline: "
            "skipped when asked)", registry=r)
        self.retries = Counter("logitcast_client_retries", "Fetch attempts retried, by status",
                               ["code"], registry=r)
        self.received_bytes = Counter("logitcast_client_received_bytes",
                                      "Target payload bytes received from the fleet", registry=r)
