"""Fleet benchmark: does the Ray Serve fleet scale, and what does the Ray path cost?

One run, the same teacher (a seeded random Llama, 1 CPU thread per replica)
and the same requests from several concurrent clients (raw gRPC streams; the
clients only count bytes, so they leave the CPU to the teachers):
(a) direct: one `logitcast serve` process, clients connect to it;
(b) ray x1: `LocalFleet` with 1 replica behind Ray Serve's gRPC proxy;
(c) ray x2: the same fleet scaled to 2 replicas.
Reports tokens/s and p99 request latency of each, scale_2_vs_1 = (c)/(b) and
ray_vs_direct = (b)/(a). This machine has 2 cores: with 2 replicas each gets
one, and the proxy, the clients and Ray's own processes share them too.

    python bench/fleet.py [--quick]

Last line: RESULT scale_2_vs_1=.. ray_vs_direct=..
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results

MODEL = "random:8192:512:6"  # vocab:hidden:layers, ~23M parameters: compute dominates


def requests(n: int, rows: int, seq_len: int, vocab: int):
    import torch

    from logitcast.ops import TargetSpec
    from logitcast.ops.codec import VERSION
    from logitcast.protos import teacher_pb2 as pb
    from logitcast.protos.convert import rows_to_proto, spec_to_proto

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        tokens = torch.randint(2, vocab, (rows, seq_len), generator=g)
        out.append(pb.DistillRequest(
            rows=rows_to_proto(tokens),
            spec=spec_to_proto(TargetSpec(method="sample", unique=12.0)),
            codec_version=VERSION, rows_per_chunk=1))
    return out


def load(address: str, reqs: list, clients: int, application: str | None) -> dict:
    """Each client thread sends its share of `reqs` in turn; tokens/s and latencies."""
    import grpc

    from logitcast.protos import teacher_pb2_grpc as pb_grpc

    meta = [("application", application)] if application else []
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def client(mine):
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.TeacherStub(channel)
            for req in mine:
                t0 = time.perf_counter()
                try:
                    for _ in stub.Distill(req, metadata=meta, timeout=300):
                        pass
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")
                    return
                with lock:
                    latencies.append(time.perf_counter() - t0)

    # warm-up: one request per client, not measured
    warm = [threading.Thread(target=client, args=([reqs[i]],)) for i in range(clients)]
    for t in warm:
        t.start()
    for t in warm:
        t.join()
    latencies.clear()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(reqs[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"requests failed: {errors[:3]}")
    tokens = sum(r.rows.rows * r.rows.seq_len for r in reqs)
    return {"tokens_per_s": tokens / wall, "p99_s": float(np.percentile(latencies, 99)),
            "p50_s": float(np.percentile(latencies, 50)), "requests": len(latencies),
            "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import logging
    import tempfile

    from logitcast.cli.serve import start_server_process
    from logitcast.server.fleet import LocalFleet

    logging.getLogger("ray").setLevel(logging.WARNING)
    clients = 4
    rows, seq_len, n = (2, 128, 24) if args.quick else (4, 256, 64)
    reqs = requests(n, rows, seq_len, vocab=8192)
    work = Path(tempfile.mkdtemp(prefix="lc-bench-fleet-"))
    results = {}
    proc, address, _ = start_server_process(["--model", MODEL, "--dtype", "fp32"],
                                            work / "direct.log", threads=1)
    try:
        results["direct"] = load(address, reqs, clients, None)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    print(f"  direct: {results['direct']['tokens_per_s']:.0f} tok/s, "
          f"p99 {results['direct']['p99_s']:.2f}s", flush=True)
    fleet = LocalFleet.up({"model": MODEL, "threads": 1, "dtype": "fp32"}, replicas=1,
                          num_cpus=2)
    try:
        results["ray_1"] = load(fleet.address, reqs, clients, "logitcast")
        print(f"  ray x1: {results['ray_1']['tokens_per_s']:.0f} tok/s, "
              f"p99 {results['ray_1']['p99_s']:.2f}s", flush=True)
        fleet.scale(2)
        results["ray_2"] = load(fleet.address, reqs, clients, "logitcast")
        print(f"  ray x2: {results['ray_2']['tokens_per_s']:.0f} tok/s, "
              f"p99 {results['ray_2']['p99_s']:.2f}s", flush=True)
    finally:
        fleet.down()
    ratios = {"scale_2_vs_1": results["ray_2"]["tokens_per_s"] / results["ray_1"]["tokens_per_s"],
              "ray_vs_direct": results["ray_1"]["tokens_per_s"] / results["direct"]["tokens_per_s"]}
    path = write_results("fleet", {
        "config": {"quick": args.quick, "model": MODEL, "threads_per_replica": 1,
                   "clients": clients, "rows": rows, "seq_len": seq_len, "requests": n,
                   "spec": "sample unique=12"},
        **results, **ratios, "goals": {"scale_2_vs_1": 1.8, "ray_vs_direct": 0.9}},
        suffix="-quick" if args.quick else "")
    print(f"results: {path}")
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
