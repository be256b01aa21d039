"""Prometheus metrics of one trainer rank, all defined here.

One registry per rank holds these and the rank's `ClientMetrics`
(`logitcast_client_wait_seconds_total` is the wait-on-teacher time), served
on /metrics at `port + local_rank`. Labels are few and fixed: `part` of the
loss (total, lm, kd) and `metric` of the eval.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from logitcast.client.metrics import ClientMetrics


class TrainerMetrics:
    """Per-rank trainer metrics in `registry` (a fresh one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.client = ClientMetrics(r)
        self.tokens = Counter("logitcast_trainer_tokens", "Tokens trained on by this rank",
                              registry=r)
        self.steps = Counter("logitcast_trainer_steps", "Optimizer steps taken", registry=r)
        self.step = Gauge("logitcast_trainer_step", "Current optimizer step", registry=r)
        self.step_seconds = Counter("logitcast_trainer_step_seconds",
                                    "Seconds spent in steps, waits included", registry=r)
        self.loss = Gauge("logitcast_trainer_loss", "Last step's loss by part", ["part"],
                          registry=r)
        self.alpha = Gauge("logitcast_trainer_alpha", "KD weight alpha of the last step",
                           registry=r)
        self.lr = Gauge("logitcast_trainer_lr", "Learning rate of the last step", registry=r)
        self.tokens_per_second = Gauge("logitcast_trainer_tokens_per_second",
                                       "Tokens/s of the last step on this rank", registry=r)
        self.eval = Gauge("logitcast_trainer_eval", "Last held-out evaluation by metric",
                          ["metric"], registry=r)
        # recording mode (trainer/record.py)
        self.record_records = Counter("logitcast_trainer_recorded_records",
                                      "Row records written to the cache while recording",
                                      registry=r)
        self.record_bytes = Counter("logitcast_trainer_recorded_bytes",
                                    "Payload bytes of the records written while recording",
                                    registry=r)
        self.record_backpressure_seconds = Counter(
            "logitcast_trainer_record_backpressure_seconds",
            "Seconds training waited for room in the recording queue", registry=r)
        self.record_queue = Gauge("logitcast_trainer_record_queue",
                                  "Micro-batches of targets waiting for the recording writer",
                                  registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start /metrics on host:port (port 0: any free port); returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port


def write_scrape_target(sd_dir: str | Path, name: str, address: str, labels: dict) -> Path:
    """Register `address` for Prometheus file_sd as `<sd_dir>/<name>.json`, atomically.
    (The server's copy of this convention is `logitcast.server.metrics.write_scrape_target`;
    the trainer does not import the server.)"""
    path = Path(sd_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([{"targets": [address], "labels": labels}]))
    os.replace(tmp, path)
    return path
