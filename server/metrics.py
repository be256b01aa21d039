"""Prometheus metrics of one teacher server, all defined here.

Each server owns a `CollectorRegistry` (several servers may share a process in
tests) exposed on its own HTTP port. Names follow Prometheus conventions:
prefix `logitcast_teacher_`, base units, counters end in `_total`, histograms
not summaries, and no high-cardinality labels (status code and method only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKENS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class TeacherMetrics:
    """The server's metrics, registered in `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.tokens = Counter("logitcast_teacher_tokens", "Positions turned into targets",
                              registry=r)
        self.requests = Counter("logitcast_teacher_requests", "Finished requests by RPC and code",
                                ["rpc", "code"], registry=r)
        self.request_seconds = Histogram("logitcast_teacher_request_seconds",
                                         "Distill request latency, admission to last chunk",
                                         buckets=_SECONDS, registry=r)
        self.batch_tokens = Histogram("logitcast_teacher_batch_tokens",
                                      "Tokens per teacher forward batch", buckets=_TOKENS,
                                      registry=r)
        self.forward_seconds = Histogram("logitcast_teacher_forward_seconds",
                                         "Teacher forward time per batch", buckets=_SECONDS,
                                         registry=r)
        self.sparsify_seconds = Histogram("logitcast_teacher_sparsify_seconds",
                                          "LM head + sparsify time per batch (device stage)",
                                          buckets=_SECONDS, registry=r)
        self.encode_seconds = Histogram("logitcast_teacher_encode_seconds",
                                        "Encode + row keys + tee time per chunk (CPU stage)",
                                        buckets=_SECONDS, registry=r)
        self.reserved_bytes = Gauge("logitcast_teacher_reserved_bytes",
                                    "Memory budget held by admitted requests (inputs and "
                                    "undelivered output)", registry=r)
        self.batch_budget_tokens = Gauge("logitcast_teacher_batch_budget_tokens",
                                         "Current tokens per forward batch (shrinks after OOM)",
                                         registry=r)
        self.faults = Counter("logitcast_teacher_faults",
                              "Batches the teacher failed on, by kind (nonfinite, oom, error)",
                              ["kind"], registry=r)
        self.stalled_streams = Counter("logitcast_teacher_stalled_streams",
                                       "Streams cancelled because the client stopped reading",
                                       registry=r)
        self.queue_tokens = Gauge("logitcast_teacher_queue_tokens",
                                  "Admitted tokens waiting for the teacher", registry=r)
        self.inflight = Gauge("logitcast_teacher_inflight_requests", "Open Distill streams",
                              registry=r)
        self.sent_bytes = Counter("logitcast_teacher_sent_bytes", "Target payload bytes streamed",
                                  registry=r)
        self.serving = Gauge("logitcast_teacher_serving", "1 while accepting requests, 0 draining",
                             registry=r)
        self.cache_records = Counter("logitcast_cache_records_written",
                                     "Target records teed into the cache", registry=r)
        self.cache_bytes = Counter("logitcast_cache_written_bytes",
                                   "Payload bytes teed into the cache", registry=r)
        self.cache_queue = Gauge("logitcast_cache_queue_records",
                                 "Records waiting for the cache writer", registry=r)
        self.cache_write_errors = Counter("logitcast_cache_write_errors",
                                          "Records the cache writer failed to write", registry=r)
        self.cache_backpressure_seconds = Counter(
            "logitcast_cache_backpressure_seconds",
            "Seconds serving waited for the cache writer to catch up", registry=r)


def reachable_host(host: str) -> str:
    """An address other machines can scrape: this node's IP when bound to all interfaces."""
    import socket

    return socket.gethostbyname(socket.gethostname()) if host in ("0.0.0.0", "", "::") else host


def write_scrape_target(sd_dir: str | Path, name: str, address: str, labels: dict) -> Path:
    """Register `address` for Prometheus file_sd discovery as `<sd_dir>/<name>.json`
    (written atomically; see docs/monitoring.md)."""
    path = Path(sd_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([{"targets": [address], "labels": labels}]))
    os.replace(tmp, path)
    return path


def remove_scrape_target(sd_dir: str | Path, name: str) -> None:
    (Path(sd_dir) / f"{name}.json").unlink(missing_ok=True)
