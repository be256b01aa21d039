"""Assemble and run a teacher server: gRPC (aio), health, reflection, auth, TLS, metrics.

`TeacherServer.start(...)` builds everything around one backend and returns a
running server; `drain()` flips health to NOT_SERVING, lets in-flight streams
finish, then stops. `logitcast serve` and Ray Serve replicas both use this.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from logitcast.cache import default_writer_id
from logitcast.ops import METHODS
from logitcast.protos import teacher_pb2 as pb
from logitcast.protos import teacher_pb2_grpc as pb_grpc
from logitcast.server.backends import TeacherBackend
from logitcast.server.engine import Engine, EngineConfig
from logitcast.server.limits import RequestLimits
from logitcast.server.metrics import (
    TeacherMetrics,
    reachable_host,
    remove_scrape_target,
    write_scrape_target,
)
from logitcast.server.service import TeacherServicer
from logitcast.server.tee import CacheTee

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Teacher"].full_name


@dataclass(frozen=True)
class TLSConfig:
    """PEM bytes of the server's private key and certificate chain."""

    key: bytes
    cert: bytes


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` (health checks stay open).

    The header is compared in constant time (`hmac.compare_digest`); a refused call
    gets UNAUTHENTICATED from a handler of the RPC's own shape, so streaming RPCs
    (Distill, reflection) fail as cleanly as unary ones."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("auth token must not be empty")
        self._expected = f"Bearer {token}".encode()

        async def deny(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or bad bearer token")

        self._deny = {
            (False, False): grpc.unary_unary_rpc_method_handler(deny),
            (False, True): grpc.unary_stream_rpc_method_handler(deny),
            (True, False): grpc.stream_unary_rpc_method_handler(deny),
            (True, True): grpc.stream_stream_rpc_method_handler(deny),
        }

    def _authorized(self, metadata) -> bool:
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        if isinstance(value, str):
            value = value.encode("utf-8", "surrogateescape")
        return isinstance(value, bytes) and hmac.compare_digest(value, self._expected)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if (details.method.startswith("/grpc.health.v1.Health/")
                or self._authorized(details.invocation_metadata)):
            return handler
        if handler is None:  # unknown method: refused too, so names leak only to the token
            return self._deny[True, True]
        return self._deny[handler.request_streaming, handler.response_streaming]


class MalformedRequestGuard(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as the RPC's request message get INVALID_ARGUMENT naming the
    parse error (gRPC's own deserializer failure would surface as UNKNOWN)."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if (handler is None or not details.method.startswith(f"/{SERVICE_NAME}/")
                or handler.request_streaming):
            return handler
        parse, behavior = handler.request_deserializer, handler.unary_unary or handler.unary_stream

        def tolerant(data: bytes):
            try:
                return parse(data)
            except Exception as exc:
                return _Malformed(f"request to {details.method} is not a valid message: {exc}")

        async def guarded(request, context):
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            return await behavior(request, context)

        kind = "unary_unary" if handler.unary_unary else "unary_stream"
        return handler._replace(request_deserializer=tolerant, **{kind: guarded})


@dataclass(frozen=True)
class _Malformed:
    reason: str


def build_core(backend: TeacherBackend, *, engine_config: EngineConfig | None,
               limits: RequestLimits, methods: tuple[str, ...], cache_dir: str | Path | None,
               writer_id: str, metrics: TeacherMetrics) -> tuple[Engine, TeacherServicer]:
    """The serving core around one backend: the engine (with a cache tee as `writer_id`
    when cache_dir is given) and the servicer. A `TeacherServer` and a Ray Serve replica
    each wrap one."""
    tee = CacheTee(cache_dir, writer_id=writer_id, metrics=metrics) if cache_dir else None
    engine = Engine(backend, engine_config or EngineConfig(), metrics, tee)
    try:
        version = metadata.version("logitcast")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return engine, TeacherServicer(engine, limits, methods=methods, version=version)


class TeacherServer:
    """A running teacher server. Build with `await TeacherServer.start(...)`."""

    def __init__(self) -> None:
        raise TypeError("use `await TeacherServer.start(...)`")

    @classmethod
    async def start(
        cls,
        backend: TeacherBackend,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        engine_config: EngineConfig | None = None,
        limits: RequestLimits | None = None,
        methods: tuple[str, ...] = METHODS,
        metrics_port: int | None = None,
        auth_token: str | None = None,
        tls: TLSConfig | None = None,
        cache_dir: str | Path | None = None,
        replica_id: str | None = None,
        metrics_sd_dir: str | Path | None = None,
        metrics_host: str | None = None,
    ) -> TeacherServer:
        """cache_dir: tee every served target into this cache, a directory or an fsspec
        URL, as writer `replica_id` ([A-Za-z0-9_]{1,64}; None: unique per process). A live
        server holding that id on that cache already: WriterIdInUseError, before serving.
        metrics_host: the interface /metrics binds to (None: `host`), e.g. 127.0.0.1 to
        keep it off the network while gRPC listens on 0.0.0.0.
        metrics_sd_dir: register the /metrics endpoint (at the host it is bound to) there
        for Prometheus file_sd."""
        self = object.__new__(cls)
        if replica_id is None:
            replica_id = default_writer_id("r")
        self.replica_id = replica_id
        self.limits = limits or RequestLimits()
        self.metrics = TeacherMetrics()
        self.engine, servicer = build_core(backend, engine_config=engine_config,
                                           limits=self.limits, methods=methods,
                                           cache_dir=cache_dir, writer_id=replica_id,
                                           metrics=self.metrics)
        self._http = None
        try:
            options = [("grpc.max_receive_message_length", self.limits.max_message_bytes),
                       ("grpc.max_send_message_length", self.limits.max_message_bytes)]
            interceptors = [BearerTokenAuth(auth_token)] if auth_token else []
            interceptors.append(MalformedRequestGuard())
            self.server = grpc.aio.server(interceptors=interceptors, options=options)
            pb_grpc.add_TeacherServicer_to_server(servicer, self.server)
            self.health = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
            address = f"{host}:{port}"
            if tls is not None:
                creds = grpc.ssl_server_credentials([(tls.key, tls.cert)])
                self.port = self.server.add_secure_port(address, creds)
            else:
                self.port = self.server.add_insecure_port(address)
            self.address = f"{host}:{self.port}"
            self.metrics_port = None
            self.metrics_host = host if metrics_host is None else metrics_host
            if metrics_port is not None:
                self._http, _ = start_http_server(metrics_port, addr=self.metrics_host,
                                                  registry=self.metrics.registry)
                self.metrics_port = self._http.server_port
            self._sd = None
            if metrics_sd_dir is not None and self.metrics_port is not None:
                self._sd = (metrics_sd_dir, f"teacher-{replica_id}")
                write_scrape_target(metrics_sd_dir, self._sd[1],
                                    f"{reachable_host(self.metrics_host)}:{self.metrics_port}",
                                    {"replica": replica_id})
            self.engine.on_unhealthy.append(self._unhealthy)
            self.engine.start()
            await self.server.start()
        except BaseException:  # e.g. the port is taken: give back the cache writer id
            if self._http is not None:
                self._http.shutdown()
            await self.engine.close()
            raise
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.metrics.serving.set(1)
        logger.info("serving %s on %s as replica %s (vocab %d, metrics port %s)",
                    backend.teacher_id, self.address, replica_id, backend.vocab_size,
                    self.metrics_port)
        return self

    def _unhealthy(self, reason: str) -> None:
        """The engine gave up on the teacher: health NOT_SERVING so balancers route away
        (new requests already get UNAVAILABLE from the engine)."""
        logger.error("health NOT_SERVING: %s", reason)
        self.metrics.serving.set(0)
        for name in ("", SERVICE_NAME):
            asyncio.ensure_future(self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING))

    async def drain(self, grace_s: float = 30.0) -> None:
        """Health NOT_SERVING, refuse new work (UNAVAILABLE), finish in-flight, stop."""
        logger.info("draining: health NOT_SERVING, finishing %d in-flight requests",
                    self.engine.active_jobs)
        self.metrics.serving.set(0)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        finished = await self.engine.drain(grace_s)
        if not finished:
            logger.warning("drain timed out after %.1fs with %d requests open", grace_s,
                           self.engine.active_jobs)
        await self.stop(grace_s=1.0)

    async def stop(self, grace_s: float = 0.0) -> None:
        await self.server.stop(grace_s)
        await self.engine.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._sd is not None:
            remove_scrape_target(*self._sd)
        logger.info("stopped %s", self.address)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def serve_until_signal(server: TeacherServer, grace_s: float = 30.0) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.drain(grace_s)
