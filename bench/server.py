"""Serving overhead benchmark: the teacher called directly vs served over loopback gRPC.

Same model (the embedded SmolLM2-135M), same rows (Python standard library
source), same machine, one run:
- bare: `model(rows).logits`, request by request (what a user runs in-process);
- served: RS-12 targets streamed through a real TeacherServer on 127.0.0.1,
  with 1 and with 4 concurrent clients (same requests, split between them).
Also: bytes per token on the wire (whole serialized chunks) and p50/p99 latency.

    python bench/server.py [--quick] [--device cpu|cuda]

Last line: RESULT served_vs_bare=.. served_vs_bare_4c=.. wire_bytes_per_token=.. p99_ms=..
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results

from logitcast.data.corpus import stdlib_documents
from logitcast.ops import TargetSpec
from logitcast.ops.codec import VERSION
from logitcast.protos import teacher_pb2 as pb
from logitcast.protos import teacher_pb2_grpc as pb_grpc
from logitcast.protos.convert import MAX_MESSAGE_BYTES, rows_to_proto, spec_to_proto
from logitcast.server.app import TeacherServer
from logitcast.server.backends import TransformersBackend
from logitcast.server.engine import EngineConfig


def corpus_rows(tok, rows: int, seq: int) -> torch.Tensor:
    ids: list[int] = []
    for doc in stdlib_documents():
        ids.extend(tok(doc)["input_ids"] + [tok.eos_token_id])
        if len(ids) >= rows * seq:
            break
    return torch.tensor(ids[: rows * seq]).view(rows, seq)


def request_for(rows: torch.Tensor) -> pb.DistillRequest:
    return pb.DistillRequest(rows=rows_to_proto(rows),
                             spec=spec_to_proto(TargetSpec(method="sample", unique=12.0)),
                             codec_version=VERSION)


def bare(backend: TransformersBackend, requests: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for rows in requests:
            backend.model(rows.to(backend.device)).logits.float().sum().item()
    return time.perf_counter() - t0


def served(address: str, requests: list[pb.DistillRequest], clients: int):
    """(seconds, wire bytes, per-request latencies) with `clients` concurrent channels."""
    latencies: list[float] = []
    wire = [0]
    lock = threading.Lock()

    def client(mine: list[pb.DistillRequest]) -> None:
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        with grpc.insecure_channel(address, options=opts) as ch:
            stub = pb_grpc.TeacherStub(ch)
            for req in mine:
                t0 = time.perf_counter()
                n = sum(c.ByteSize() for c in stub.Distill(req))
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    wire[0] += n

    shares = [requests[i::clients] for i in range(clients)]
    threads = [threading.Thread(target=client, args=(s,)) for s in shares]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, wire[0], latencies


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, <= 60 s on 2 cores")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    n_requests, rows_per_request, seq = (8, 2, 256) if args.quick else (24, 4, 512)

    from logitcast.server.embedded import load_embedded_teacher

    backend = TransformersBackend.from_pretrained("default", dtype="bf16", device=args.device)
    _, tok = load_embedded_teacher()
    rows = corpus_rows(tok, n_requests * rows_per_request, seq)
    chunks = list(rows.split(rows_per_request))
    tokens = rows.numel()
    bare(backend, chunks[:1])  # warm-up
    bare_s = bare(backend, chunks)
    print(f"bare teacher forward: {tokens} tokens in {bare_s:.2f}s = {tokens / bare_s:.0f} tok/s")

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    config = EngineConfig(max_batch_tokens=2 * rows_per_request * seq)
    server = asyncio.run_coroutine_threadsafe(
        TeacherServer.start(backend, port=0, engine_config=config), loop).result(120)
    requests = [request_for(c) for c in chunks]
    served(server.address, requests[:1], 1)  # warm-up
    results = {}
    for clients in (1, 4):
        secs, wire, lat = served(server.address, requests, clients)
        results[clients] = {
            "seconds": secs, "tok_per_s": tokens / secs, "vs_bare": bare_s / secs,
            "wire_bytes_per_token": wire / tokens, "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * pct(lat, 0.99),
        }
        r = results[clients]
        print(f"served, {clients} client(s): {r['tok_per_s']:.0f} tok/s = x{r['vs_bare']:.3f} "
              f"of bare; {r['wire_bytes_per_token']:.1f} B/token on the wire; "
              f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms")
    def total(histogram) -> float:
        return next(s.value for s in histogram.collect()[0].samples if s.name.endswith("_sum"))

    fsum, ssum = total(server.metrics.forward_seconds), total(server.metrics.sparsify_seconds)
    esum = total(server.metrics.encode_seconds)
    print(f"server time split: forward {fsum:.2f}s, LM head + sparsify {ssum:.2f}s "
          f"({ssum / fsum:.2f} of forward), encode + keys on the CPU stage {esum:.2f}s "
          f"(overlapped)")
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)

    result = {
        "served_vs_bare": round(results[1]["vs_bare"], 3),
        "served_vs_bare_4c": round(results[4]["vs_bare"], 3),
        "wire_bytes_per_token": round(results[1]["wire_bytes_per_token"], 2),
        "p99_ms": round(results[1]["p99_ms"], 1),
    }
    suffix = ("-quick" if args.quick else "") + ("-gpu" if args.device.startswith("cuda") else "")
    path = write_results("server", {
        "quick": args.quick, "device": args.device, "requests": n_requests,
        "rows_per_request": rows_per_request, "seq_len": seq, "tokens": tokens,
        "bare_seconds": bare_s, "bare_tok_per_s": tokens / bare_s,
        "served": {str(k): v for k, v in results.items()},
        "server_forward_seconds": fsum, "server_sparsify_seconds": ssum,
        "server_encode_seconds": esum, "result": result,
    }, suffix=suffix)
    print(f"wrote {path}")
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
