"""`logitcast serve`: one teacher server in this process, until SIGTERM/SIGINT (then drain)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from logitcast.ops import METHODS

    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M), 'tiny' (random test model), "
                        "'random:VOCAB:HIDDEN:LAYERS', a local path or a hub id")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add_backend_arguments(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port")
    p.add_argument("--metrics-host", default=None,
                   help="interface /metrics binds to (default: --host); 127.0.0.1 keeps it "
                        "off the network")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated methods to serve (default: all of {','.join(METHODS)})")
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--max-queue-tokens", type=int, default=262144)
    p.add_argument("--max-queue-bytes", type=int, default=512 << 20,
                   help="memory budget of admitted requests: inputs plus undelivered output")
    p.add_argument("--stream-buffer-bytes", type=int, default=16 << 20,
                   help="undelivered output one stream may hold before its job pauses")
    p.add_argument("--stall-timeout-s", type=float, default=60.0,
                   help="cancel a stream whose client reads nothing for this long")
    p.add_argument("--max-teacher-faults", type=int, default=3,
                   help="consecutive failed batches (NaN/inf, crashes) before NOT_SERVING")
    p.add_argument("--max-rows", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=131072)
    p.add_argument("--max-draws", type=int, default=128,
                   help="largest draws / max_draws a sampled spec may ask for")
    p.add_argument("--allow-full", action="store_true",
                   help="serve dense `full` targets (V entries per position)")
    p.add_argument("--max-full-vocab", type=int, default=8192,
                   help="refuse `full` for teachers with a larger vocabulary")
    p.add_argument("--auth-token-file", type=Path, default=None,
                   help="require 'authorization: Bearer <token>' with the token in this file")
    p.add_argument("--tls-cert", type=Path, default=None)
    p.add_argument("--tls-key", type=Path, default=None)
    p.add_argument("--drain-grace-s", type=float, default=30.0)
    p.add_argument("--cache-dir", default=None,
                   help="tee every served target into this cache: a directory or an fsspec URL "
                        "(s3://bucket/prefix)")
    p.add_argument("--metrics-sd-dir", type=Path, default=None,
                   help="register /metrics for Prometheus file_sd discovery in this directory")
    p.add_argument("--replica-id", default=None,
                   help="this server's cache writer id, [A-Za-z0-9_]{1,64}, unique per server "
                        "sharing a cache (default: unique per process)")


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    """--backend and the vLLM options (shared by `serve` and `fleet up`)."""
    g = p.add_argument_group("teacher backend")
    g.add_argument("--backend", default="hf", choices=["hf", "vllm"],
                   help="hf: transformers forward; vllm: vLLM's pooling runner gives hidden "
                        "states, our code the LM head and sparsify")
    g.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="vllm: GPUs one teacher spans (default 1)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="vllm: longest row or document segment (default: the model's)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vllm: fraction of GPU memory it may take (default 0.9)")
    g.add_argument("--quantization", default=None,
                   help="vllm: a quantisation method it loads (awq, gptq, fp8, ...); default: "
                        "as the checkpoint says")
    g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="vllm: no torch.compile/CUDA graphs (default: eager on CPU only)")
    g.add_argument("--batch-invariant", default=None, choices=["auto", "on", "off"],
                   help="vllm: batch-invariant kernels, byte-identical targets whatever a row "
                        "is batched with (default auto: on for NVIDIA compute capability >= 8)")
    g.add_argument("--kv-cache-gib", type=int, default=None,
                   help="vllm on CPU: KV cache space in GiB (default 2)")


_VLLM_FLAGS = {"tensor_parallel_size": "--tensor-parallel-size",
               "max_model_len": "--max-model-len",
               "gpu_memory_utilization": "--gpu-memory-utilization",
               "quantization": "--quantization", "enforce_eager": "--[no-]enforce-eager",
               "batch_invariant": "--batch-invariant", "kv_cache_gib": "--kv-cache-gib"}


def vllm_options(args: argparse.Namespace) -> dict:
    """The `VLLMOptions` fields given on the command line; SystemExit when a vLLM option
    comes with --backend hf or is out of range."""
    given = {k: getattr(args, k) for k in _VLLM_FLAGS if getattr(args, k, None) is not None}
    if args.backend != "vllm":
        if given:
            flags = ", ".join(_VLLM_FLAGS[k] for k in given)
            raise SystemExit(f"{flags}: vLLM options; add --backend vllm")
        return {}
    try:
        from logitcast.server.vllm_backend import VLLMOptions

        VLLMOptions(**given)
    except ValueError as exc:
        raise SystemExit(f"--backend vllm: {exc}") from exc
    return given


def run(args: argparse.Namespace) -> int:
    import asyncio

    from logitcast.cache import WriterIdInUseError
    from logitcast.cache.records import check_writer_id
    from logitcast.ops import METHODS
    from logitcast.server.app import TeacherServer, TLSConfig, serve_until_signal
    from logitcast.server.backends import load_backend
    from logitcast.server.engine import EngineConfig
    from logitcast.server.limits import RequestLimits
    from logitcast.server.vllm_backend import TeacherLoadError

    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    tls = (TLSConfig(key=args.tls_key.read_bytes(), cert=args.tls_cert.read_bytes())
           if args.tls_cert else None)
    token = args.auth_token_file.read_text().strip() if args.auth_token_file else None
    try:
        engine = EngineConfig(max_batch_tokens=args.max_batch_tokens,
                              max_wait_s=args.max_wait_ms / 1000.0,
                              max_queue_tokens=args.max_queue_tokens,
                              max_queue_bytes=args.max_queue_bytes,
                              stream_buffer_bytes=args.stream_buffer_bytes,
                              stall_timeout_s=args.stall_timeout_s,
                              max_teacher_faults=args.max_teacher_faults)
        limits = RequestLimits(max_rows=args.max_rows, max_tokens=args.max_tokens,
                               max_draws=args.max_draws, allow_full=args.allow_full,
                               max_full_vocab=args.max_full_vocab)
    except ValueError as exc:
        raise SystemExit(f"logitcast serve: {exc}") from exc
    if args.replica_id is not None:
        try:
            check_writer_id(args.replica_id)
        except ValueError as exc:
            raise SystemExit(f"logitcast serve: --replica-id: {exc}") from exc
    try:
        backend = load_backend(args.model, dtype=args.dtype, device=args.device,
                               backend=args.backend, vllm_options=vllm_options(args))
    except (ValueError, ImportError, TeacherLoadError) as exc:  # a clear line, not a traceback
        raise SystemExit(f"logitcast serve: cannot load teacher {args.model!r} "
                         f"(--backend {args.backend}): {exc}") from exc

    async def main() -> None:
        server = await TeacherServer.start(
            backend, host=args.host, port=args.port, engine_config=engine, limits=limits,
            methods=methods, metrics_port=args.metrics_port, metrics_host=args.metrics_host,
            auth_token=token, tls=tls,
            cache_dir=args.cache_dir, replica_id=args.replica_id,
            metrics_sd_dir=args.metrics_sd_dir)
        await serve_until_signal(server, grace_s=args.drain_grace_s)

    try:
        asyncio.run(main())
    except WriterIdInUseError as exc:  # another live server tees into --cache-dir as this id
        raise SystemExit(f"logitcast serve: {exc}; give each server sharing --cache-dir its own "
                         "--replica-id, or none for a unique one") from exc
    return 0


def start_server_process(serve_args: list[str], log: Path, *, threads: int | None = None,
                         timeout_s: float = 300.0, port: int | None = None):
    """`logitcast serve` in a child process on a free loopback port, with `serve_args`;
    returns (process, address, Info response) once it answers, or raises RuntimeError
    naming the log. threads: OMP_NUM_THREADS of the child (None: inherit). port: listen
    on this port instead (e.g. to restart a killed server where its clients expect it).
    With `--auth-token-file` in serve_args, the Info probe sends that token."""
    import os
    import subprocess
    import sys
    import time

    import grpc

    from logitcast.protos import teacher_pb2 as pb
    from logitcast.protos import teacher_pb2_grpc as pb_grpc
    from logitcast.server.fleet import free_port

    if port is None:
        port = free_port()
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with log.open("w") as out:  # the child keeps its own handle
        proc = subprocess.Popen(
            [sys.executable, "-m", "logitcast.cli.main", "serve", "--port", str(port),
             *serve_args], stdout=out, stderr=subprocess.STDOUT, env=env)
    address = f"127.0.0.1:{port}"
    metadata = []
    for flag, value in zip(serve_args, serve_args[1:]):
        if flag == "--auth-token-file":
            metadata = [("authorization", f"Bearer {Path(value).read_text().strip()}")]
    deadline = time.monotonic() + timeout_s
    # reconnect quickly: the default backoff would notice a server minutes into its start late
    options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.TeacherStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the teacher server exited; see {log}")
            try:
                return proc, address, stub.Info(pb.InfoRequest(), timeout=2, metadata=metadata)
            except grpc.RpcError:
                time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the teacher server did not answer within {timeout_s:.0f}s; see {log}")
