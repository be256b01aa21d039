"""`logitcast fleet up`: a local teacher fleet on Ray Serve, until SIGTERM/SIGINT.

Starts Ray here (temp dir of its own, `RAY_AUTH_MODE=disabled` unless set),
Ray Serve's gRPC proxy on `--grpc-port` and N teacher replicas; clients use the
printed address with `application="logitcast"` (`teacher.application` in a
trainer config). On a signal the replicas drain, flush their cache tee and Ray
shuts down. For a cluster, `serve deploy deploy/serve.yaml` on a running Ray.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["up"], help="up: start a local fleet and serve")
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M), 'tiny', 'random:V:H:L', a path")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    from logitcast.cli.serve import add_backend_arguments

    add_backend_arguments(p)
    p.add_argument("--threads", type=int, default=1, help="torch threads per CPU replica")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                   help="autoscale between MIN and MAX replicas instead of --replicas")
    p.add_argument("--max-ongoing-requests", type=int, default=16)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="default: 1 (vllm: --tensor-parallel-size) when this machine has a GPU, else 0")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use here")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--cache-dir", default=None,
                   help="tee every target into this cache, a directory or an fsspec URL "
                        "(one writer per replica)")
    p.add_argument("--metrics-sd-dir", type=Path, default=None,
                   help="register each replica's /metrics here for Prometheus file_sd")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--temp-dir", type=Path, default=None, help="Ray's temp dir (short path)")


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    import torch

    from logitcast.cli.serve import vllm_options
    from logitcast.server.fleet import LocalFleet

    autoscale = None
    if args.autoscale:
        try:
            lo, hi = (int(x) for x in args.autoscale.split(":"))
        except ValueError:
            raise SystemExit(f"--autoscale: expected MIN:MAX, got {args.autoscale!r}") from None
        autoscale = (lo, hi)
    options = vllm_options(args)
    gpus = args.gpus_per_replica
    if gpus is None:  # one replica per GPU, or per tensor-parallel group of GPUs
        tp = options.get("tensor_parallel_size", 1)
        gpus = float(tp) if torch.cuda.is_available() and args.device != "cpu" else 0.0
    replica = {"model": args.model, "dtype": args.dtype, "device": args.device,
               "backend": args.backend, "vllm": options,
               "threads": args.threads if gpus == 0 else 0,
               "cache_dir": args.cache_dir,
               "metrics_sd_dir": str(args.metrics_sd_dir) if args.metrics_sd_dir else None,
               "metrics_host": args.metrics_host}
    fleet = LocalFleet.up(replica, replicas=args.replicas, autoscale=autoscale,
                          max_ongoing_requests=args.max_ongoing_requests,
                          num_cpus_per_replica=args.cpus_per_replica,
                          num_gpus_per_replica=gpus, grpc_port=args.grpc_port,
                          http_port=args.http_port, host=args.host, num_cpus=args.num_cpus,
                          temp_dir=args.temp_dir)
    stop = threading.Event()  # after ray.init, which installs its own (aborting) handlers
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        size = f"{autoscale[0]}-{autoscale[1]} (autoscaling)" if autoscale else args.replicas
        print(f"fleet up: {size} replica(s) of {fleet.info.teacher_id} behind the Ray Serve "
              f"gRPC proxy at {fleet.address} (application 'logitcast')"
              + (f"; teeing into {args.cache_dir}" if args.cache_dir else ""), flush=True)
        while not stop.wait(1.0):
            pass
        print("fleet: stopping (replicas drain and flush their cache tee)", flush=True)
    finally:
        fleet.down()
    return 0
