"""`logitcast demo`: the whole system on this machine, with the real teacher, in minutes.

1. tokenize a slice of the Python standard library source (train and held-out files);
2. start a teacher server (`logitcast serve`, the embedded SmolLM2-135M) on loopback,
   teeing every target into a cache;
3. train student A online on RS-12 targets streamed for its exact packed rows;
4. stop the server (it drains and flushes the tee), then train a smaller student B
   offline from the cache, with no teacher anywhere;
5. train a CE-only baseline, the same size as A, on the same rows and budget;
6. print a table (held-out LM loss, KL to the teacher, ECE, top-1 agreement, tok/s,
   bytes/token) and write a PNG of the eval curves.
Every student is evaluated on the same held-out rows against the same teacher targets
(head_tail, read from the cache for B and the baseline).
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, default=Path(".cache/demo"))
    p.add_argument("--files", type=int, default=30, help="stdlib source files to train on")
    p.add_argument("--heldout-files", type=int, default=4, help="further files held out")
    p.add_argument("--steps", type=int, default=80, help="optimizer steps per student")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="rows per step")
    p.add_argument("--student", default="tiny-16m", help="preset of student A and the baseline")
    p.add_argument("--small-student", default="tiny-7m", help="preset of offline student B")
    p.add_argument("--alpha", type=float, default=0.9, help="KD weight of the KD students")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine)")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-rows", type=int, default=8)
    p.add_argument("--teacher-threads", type=int, default=0,
                   help="CPU threads of the teacher process (0: all cores)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto uses a GPU when one is present")


def _train(name: str, overrides: dict, base: dict):
    from logitcast.trainer import Trainer, load_config, read_log

    config = load_config(None, [f"{k}={json.dumps(v)}" for k, v in {**base, **overrides}.items()])
    t0 = time.perf_counter()
    with Trainer(config) as trainer:
        port = f", metrics http://127.0.0.1:{trainer.metrics_port}/metrics" \
            if trainer.metrics_port else ""
        print(f"    {name}: {config.student.preset} ({trainer.num_parameters / 1e6:.1f}M "
              f"parameters), targets from {config.teacher.source}{port}", flush=True)
        final = trainer.run()
        received = trainer.metrics.client.received_bytes._value.get()
    log = read_log(config.output_dir)
    speeds = [r["tokens_per_s"] for r in log if r["kind"] == "train"][1:]
    return {"name": name, "final": final, "log": log, "received": received,
            "tok_s": sum(speeds) / max(len(speeds), 1), "seconds": time.perf_counter() - t0,
            "preset": config.student.preset, "params": trainer.num_parameters}


def _namespace_bytes_per_token(cache: Path, spec: dict, seq_len: int) -> float:
    """Disk bytes per position of the namespace holding `spec` (one record per row)."""
    from logitcast.cache import CacheReader, list_namespaces, open_storage
    from logitcast.ops import TargetSpec

    want = TargetSpec.from_dict(spec)
    for ns in list_namespaces(open_storage(cache)):
        if ns.spec == want:
            reader = CacheReader(cache, ns)
            positions = len(reader) * seq_len
            reader.close()
            size = sum(f.stat().st_size for f in (cache / ns.name).rglob("*") if f.is_file())
            return size / max(positions, 1)
    return float("nan")


def _plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for metric, ax in zip(("lm_loss", "kl_to_teacher", "ece"), axes):
        for r in results:
            pts = [(e["step"], e[metric]) for e in r["log"]
                   if e["kind"] == "eval" and e.get(metric) is not None]
            ax.plot(*zip(*pts), marker="o", label=r["name"])
        ax.set_xlabel("step")
        ax.set_title(f"held-out {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from logitcast.cli.serve import start_server_process
    from logitcast.cli.tokenize import load_tokenizer
    from logitcast.client.corpus import stdlib_source_files
    from logitcast.client.shards import TokenCorpus
    from logitcast.client.tokenize import tokenize_sources
    from logitcast.server.embedded import default_cache_dir
    from logitcast.server.fleet import free_port

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    work = args.workdir
    for sub in ("cache", "runs", "tokens", "heldout"):
        shutil.rmtree(work / sub, ignore_errors=True)
    t0 = time.perf_counter()
    tok, fingerprint, vocab = load_tokenizer("default")  # also builds the teacher cache once
    files = stdlib_source_files()
    train_files, held = files[:args.files], files[args.files:args.files + args.heldout_files]
    tokenize_sources(train_files, work / "tokens", tok, fingerprint, vocab_size=vocab)
    tokenize_sources(held, work / "heldout", tok, fingerprint, vocab_size=vocab)
    train, heldout = TokenCorpus(work / "tokens"), TokenCorpus(work / "heldout")
    need = args.steps * args.batch * args.seq_len
    print(f"[1/6] corpus: {train.num_documents} stdlib files, {train.num_tokens} tokens for "
          f"training ({need} per student), {heldout.num_tokens} held out "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)

    cache = (work / "cache").resolve()
    # On a CPU the teacher and student A share the cores; the student mostly waits on
    # the teacher (the bottleneck here), so both get every core.
    cores = torch.get_num_threads()
    teacher_threads = args.teacher_threads or cores
    server_metrics = free_port()
    proc, address, info = start_server_process(
        ["--model", "default", "--metrics-port", str(server_metrics), "--cache-dir", str(cache),
         "--replica-id", "demo", "--device", device, "--drain-grace-s", "30",
         "--dtype", "fp32" if device == "cpu" else "bf16"],  # bf16 matmuls are slow on CPUs
        work / "server.log", threads=teacher_threads)
    print(f"[2/6] teacher {info.teacher_id} serving on {address} ({device}); teeing into "
          f"{cache}; metrics http://127.0.0.1:{server_metrics}/metrics", flush=True)

    rs12 = {"method": "sample", "unique": 12.0}
    base = {"steps": args.steps, "data.train_tokens": str(work / "tokens"),
            "data.eval_tokens": str(work / "heldout"), "data.seq_len": args.seq_len,
            "data.global_batch": args.batch, "student.preset": args.student,
            "eval.every": args.eval_every, "eval.rows": args.eval_rows, "metrics_port": 0,
            "optim.lr": {"name": "cosine", "peak": args.lr, "warmup_frac": 0.1,
                         "floor": args.lr / 10},
            "loss.alpha": {"name": "constant", "value": args.alpha}, "teacher.spec": rs12,
            "export_tokenizer": str(default_cache_dir())}
    results = []
    try:
        print("[3/6] student A, online: RS-12 targets streamed from the teacher", flush=True)
        if device == "cpu":
            torch.set_num_threads(max(1, cores - teacher_threads))
        results.append(_train("A online RS-12", {
            "output_dir": str(work / "runs" / "online"), "teacher.source": "online",
            "teacher.addresses": [address]}, base))
    finally:
        torch.set_num_threads(cores)
        proc.send_signal(signal.SIGTERM)  # drain: finish in-flight work, flush the tee
        proc.wait(timeout=120)
    print("[4/6] student B, offline: the same rows from the cache, no teacher running",
          flush=True)
    results.append(_train("B offline RS-12", {
        "output_dir": str(work / "runs" / "offline"), "teacher.source": "cache",
        "teacher.cache_dir": str(cache), "student.preset": args.small_student}, base))
    print("[5/6] baseline: cross-entropy only, same rows and budget", flush=True)
    results.append(_train("CE only", {
        "output_dir": str(work / "runs" / "ce"), "teacher.source": "none", "eval.source": "cache",
        "teacher.cache_dir": str(cache)}, base))

    tokens = args.steps * args.batch * args.seq_len
    wire = results[0]["received"] / tokens
    on_disk = _namespace_bytes_per_token(cache, rs12, args.seq_len)
    print(f"[6/6] results after {args.steps} steps x {args.batch} x {args.seq_len} tokens "
          f"({time.perf_counter() - t0:.0f}s in all)\n")
    head = f"{'student':<18}{'params':>8}{'heldout LM':>12}{'KL(T||S)':>10}{'ECE':>8}" \
           f"{'top1 agree':>12}{'tok/s':>8}{'bytes/tok':>11}"
    print(head)
    print("-" * len(head))
    bytes_col = [f"{wire:.1f} wire", f"{on_disk:.1f} disk", "0"]
    for r, b in zip(results, bytes_col):
        f = r["final"]
        kl, agree = f.get("kl_to_teacher"), f.get("top1_agreement")
        print(f"{r['name']:<18}{r['params'] / 1e6:>7.1f}M{f['lm_loss']:>12.3f}"
              f"{kl if kl is not None else float('nan'):>10.3f}{f['ece']:>8.3f}"
              f"{agree if agree is not None else float('nan'):>12.3f}{r['tok_s']:>8.0f}"
              f"{b:>11}")
    plot = work / "eval_curves.png"
    summary = {"steps": args.steps, "tokens_per_student": tokens, "device": device,
               "wire_bytes_per_token": wire, "cache_bytes_per_token": on_disk,
               "students": [{k: r[k] for k in ("name", "preset", "params", "final", "tok_s",
                                               "seconds")} for r in results]}
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\neval curves: {plot if _plot(results, plot) else '(matplotlib missing: no plot)'}")
    print(f"summary: {work / 'summary.json'}; students: {work / 'runs'}/*/student; "
          f"target cache: {cache}; teacher log: {work / 'server.log'}")
    print("metrics: the teacher and each trainer served Prometheus /metrics at the URLs above "
          "while they ran")
    return 0 if all(r["final"] for r in results) else 1
