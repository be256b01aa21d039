"""The teacher fleet on Ray Serve: one replica per teacher, behind Ray Serve's gRPC proxy.

Each replica holds the same core as `logitcast serve` — an `Engine` (batching,
teacher forward, sparsify, encode, cache tee) and the `TeacherServicer`
(admission control, status codes) — so there is no second implementation of
any of it. Ray Serve's gRPC proxy calls the deployment's `Distill` / `Info` /
`Score` methods, named after the RPCs, with the request protos; `Distill` is an
async generator, streamed back by the proxy. Clients send the `application`
metadata (`TeacherClient(..., application="logitcast")`) and otherwise talk to
the proxy exactly as to one server. Errors keep their status codes: the
servicer's `abort` sets the code on Ray's gRPC context and raises, and the proxy
returns that code.

Per replica: a cache writer with its own id (`ray_<replica id>`, so shard names
never collide and readers merge the index), a Prometheus /metrics endpoint on a
free port, registered for discovery as `<metrics_sd_dir>/teacher-<replica>.json`,
and a Serve health check that fails when the engine's batcher has died.
Scaling, placement (`num_gpus: 1` per replica on GPU clusters), autoscaling and
`max_ongoing_requests` are Ray Serve settings (`deploy/serve.yaml`).

This module knows nothing about how Ray is started (`logitcast fleet up`, `serve run`).
"""

from __future__ import annotations

import logging
import re
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
from ray import serve

from logitcast.ops import METHODS
from logitcast.server.app import build_core
from logitcast.server.backends import load_backend
from logitcast.server.engine import EngineConfig
from logitcast.server.limits import RequestLimits
from logitcast.server.metrics import (
    TeacherMetrics,
    reachable_host,
    remove_scrape_target,
    write_scrape_target,
)

logger = logging.getLogger(__name__)

APP_NAME = "logitcast"
DEPLOYMENT_NAME = "Teacher"
#: What Ray Serve's gRPC proxy needs in `grpc_options.grpc_servicer_functions`.
SERVICER_FUNCTIONS = ["logitcast.protos.teacher_pb2_grpc.add_TeacherServicer_to_server"]


@dataclass(kw_only=True)
class ReplicaConfig:
    """What every teacher replica loads and how it serves (the application's args)."""

    model: str = "default"
    """'default' (embedded SmolLM2-135M), 'tiny', 'random:V:H:L', a path or hub id."""
    dtype: str = "bf16"
    """bf16, fp16 or fp32."""
    backend: str = "hf"
    """hf (transformers) or vllm."""
    vllm: dict[str, Any] = field(default_factory=dict)
    """`VLLMOptions` fields (tensor_parallel_size, max_model_len, gpu_memory_utilization,
    quantization, enforce_eager, batch_invariant, kv_cache_gib) for backend vllm. A
    replica spanning N GPUs (tensor_parallel_size N) needs `num_gpus: N`."""
    device: str = "auto"
    """auto (cuda when the replica was given a GPU), cpu or cuda."""
    threads: int = 0
    """torch CPU threads per replica (0: torch's default)."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """Sparsify methods this fleet serves."""
    engine: dict[str, Any] = field(default_factory=dict)
    """`EngineConfig` fields (max_batch_tokens, max_wait_s, max_queue_tokens, ...)."""
    limits: dict[str, Any] = field(default_factory=dict)
    """`RequestLimits` fields (max_rows, max_tokens, ...)."""
    cache_dir: str | None = None
    """Tee every target into this (shared) cache; each replica writes its own shards."""
    metrics_host: str = "127.0.0.1"
    """Interface of each replica's /metrics endpoint (0.0.0.0 for a remote Prometheus)."""
    metrics_sd_dir: str | None = None
    """Write a Prometheus file_sd target for each replica here."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"methods: unknown {unknown}; choose from {list(METHODS)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"backend must be hf or vllm, got {self.backend!r}")
        if self.vllm and self.backend != "vllm":
            raise ValueError(f"vllm options {sorted(self.vllm)} need backend: vllm")
        if self.backend == "vllm":
            from logitcast.server.vllm_backend import VLLMOptions

            VLLMOptions(**self.vllm)
        EngineConfig(**self.engine)
        RequestLimits(**self.limits)


class RpcAbort(Exception):
    """Raised by `RayContext.abort`: ends the call with the code set on Ray's context."""


class RayContext:
    """The part of `grpc.aio.ServicerContext` our servicer uses, over Ray's gRPC context."""

    def __init__(self, ray_context) -> None:
        self._ctx = ray_context

    async def abort(self, code: grpc.StatusCode, details: str):
        if self._ctx is not None:
            self._ctx.set_code(code)
            self._ctx.set_details(details)
        raise RpcAbort(f"{code.name}: {details}")


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=16, health_check_period_s=5,
                  health_check_timeout_s=30, graceful_shutdown_timeout_s=60)
class TeacherDeployment:
    """One teacher replica."""

    def __init__(self, config: dict | None = None) -> None:
        import torch

        self.config = c = ReplicaConfig(**(config or {}))
        if c.threads:
            torch.set_num_threads(c.threads)
        device = c.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        backend = load_backend(c.model, dtype=c.dtype, device=device, backend=c.backend,
                               vllm_options=c.vllm)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except RuntimeError:  # constructed outside Serve (tests of this class alone)
            self.replica = socket.gethostname()
        self.metrics = TeacherMetrics()
        writer_id = "ray_" + re.sub(r"\W", "_", self.replica)  # cache writer ids: [A-Za-z0-9_]
        self.engine, self.servicer = build_core(
            backend, engine_config=EngineConfig(**c.engine), limits=RequestLimits(**c.limits),
            methods=tuple(c.methods), cache_dir=c.cache_dir, writer_id=writer_id,
            metrics=self.metrics)
        from prometheus_client import start_http_server

        self._http, _ = start_http_server(0, addr=c.metrics_host, registry=self.metrics.registry)
        self.metrics_address = f"{reachable_host(c.metrics_host)}:{self._http.server_port}"
        if c.metrics_sd_dir:
            write_scrape_target(c.metrics_sd_dir, f"teacher-{self.replica}",
                                self.metrics_address, {"replica": self.replica})
        self._started = False
        logger.info("replica %s: teacher %s on %s, metrics %s", self.replica,
                    backend.teacher_id, device, self.metrics_address)

    def _start(self) -> None:
        if not self._started:  # the engine binds to the replica's event loop on first use
            self.engine.start()
            self.metrics.serving.set(1)
            self._started = True

    async def Distill(self, request, grpc_context=None):
        self._start()
        async for chunk in self.servicer.distill_chunks(request, RayContext(grpc_context)):
            yield chunk

    async def Info(self, request, grpc_context=None):
        self._start()
        return await self.servicer.Info(request, RayContext(grpc_context))

    async def Score(self, request, grpc_context=None):
        self._start()
        return await self.servicer.Score(request, RayContext(grpc_context))

    def check_health(self) -> None:
        """Serve's health probe: the engine's stages must be alive and the teacher must not
        have failed `max_teacher_faults` batches in a row (Serve then replaces the replica)."""
        if self._started:
            try:
                self.engine.check_health()
            except RuntimeError as exc:
                raise RuntimeError(f"replica {self.replica}: {exc}") from exc

    async def __del__(self) -> None:
        """Graceful stop: finish in-flight streams, flush the cache tee, deregister."""
        self.metrics.serving.set(0)
        if self._started:
            await self.engine.drain(30.0)
            await self.engine.close()
        elif self.engine.tee is not None:
            self.engine.tee.close()
        if self.config.metrics_sd_dir:
            remove_scrape_target(self.config.metrics_sd_dir, f"teacher-{self.replica}")
        self._http.shutdown()


def build_app(args: dict | None = None):
    """Application builder for `serve run logitcast.server.ray_app:build_app` and
    deploy/serve.yaml: args are `ReplicaConfig` fields."""
    config = ReplicaConfig(**(args or {}))
    return TeacherDeployment.bind(asdict(config))
