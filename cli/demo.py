"""`logitcast demo`: the whole system on this machine, with the real teacher, in minutes.

1. tokenize a slice of the Python standard library source (train and held-out files);
2. prune two students from the teacher (`logitcast prune`): A keeps its 4 most important
   blocks, the smaller B 2; both keep the teacher's embedding and tied LM head, frozen
   (`--from-scratch` trains randomly initialised presets instead);
3. start a teacher server (`logitcast serve`, the embedded SmolLM2-135M) on loopback,
   teeing every target into a cache;
4. train student A online on RS-12 targets streamed for its exact packed rows;
5. stop the server (it drains and flushes the tee), then train B offline from the
   cache, with no teacher anywhere;
6. train a CE-only baseline from A's initialisation, on the same rows and budget;
7. print a table (held-out LM loss, KL to the teacher, ECE, top-1 agreement, tok/s,
   bytes/token) with the teacher's own held-out loss as the floor and the untrained
   students' as the start, and write a PNG of the eval curves.
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
    p.add_argument("--steps", type=int, default=40,
                   help="optimizer steps per student (40: the whole demo in < 10 min on 2 cores)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="rows per step")
    p.add_argument("--layers", type=int, default=4,
                   help="teacher blocks pruned student A and the baseline keep")
    p.add_argument("--small-layers", type=int, default=2,
                   help="teacher blocks the offline student B keeps")
    p.add_argument("--from-scratch", action="store_true",
                   help="random-init presets (--student, --small-student) instead of students "
                        "pruned from the teacher: they stay near a unigram model at this budget")
    p.add_argument("--student", default="tiny-16m",
                   help="with --from-scratch: preset of student A and the baseline")
    p.add_argument("--small-student", default="tiny-7m",
                   help="with --from-scratch: preset of offline student B")
    p.add_argument("--alpha", type=float, default=0.9,
                   help="KD weight of the KD students (default 0.9)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate, cosine (default 1e-3 pruned, 3e-3 from scratch)")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-rows", type=int, default=8)
    p.add_argument("--teacher-threads", type=int, default=0,
                   help="CPU threads of the teacher process (0: all cores); student A "
                        "gets the rest, at least one")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto uses a GPU when one is present")


def _train(name: str, overrides: dict, base: dict):
    from logitcast.trainer import Trainer, load_config, read_log

    config = load_config(None, [f"{k}={json.dumps(v)}" for k, v in {**base, **overrides}.items()])
    t0 = time.perf_counter()
    with Trainer(config) as trainer:
        port = f", metrics http://127.0.0.1:{trainer.metrics_port}/metrics" \
            if trainer.metrics_port else ""
        print(f"    {name}: {_student_name(config)} ({trainer.num_parameters / 1e6:.1f}M "
              f"parameters), targets from {config.teacher.source}{port}", flush=True)
        final = trainer.run()
        received = trainer.metrics.client.received_bytes._value.get()
    log = read_log(config.output_dir)
    speeds = [r["tokens_per_s"] for r in log if r["kind"] == "train"][1:]
    return {"name": name, "final": final, "log": log, "received": received,
            "tok_s": sum(speeds) / max(len(speeds), 1), "seconds": time.perf_counter() - t0,
            "student": _student_name(config), "params": trainer.num_parameters}


def _student_name(config) -> str:
    return Path(config.student.path).name if config.student.path else config.student.preset


def _prune(work: Path, name: str, layers: int) -> Path:
    """`logitcast prune --layers N` of the embedded teacher, calibrated on the train split."""
    from logitcast.cli.main import main as cli

    out = work / "students" / name
    argv = ["prune", "--teacher", "default", "--layers", str(layers), "--calibration",
            str(work / "tokens"), "--out", str(out), "--force"]
    print(f"    logitcast {' '.join(argv)}", flush=True)
    if cli(argv) != 0:
        raise SystemExit(f"logitcast demo: pruning {name} failed (see above)")
    return out


def _closed(student: dict, baseline: dict, floor: float) -> float:
    """The fraction of the baseline's held-out loss above the teacher's that `student` removes."""
    above = baseline["lm_loss"] - floor
    return (baseline["lm_loss"] - student["lm_loss"]) / above if above > 0 else float("nan")


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
    from logitcast.data.corpus import stdlib_source_files
    from logitcast.data.shards import TokenCorpus
    from logitcast.data.tokenize import tokenize_sources
    from logitcast.server.embedded import default_cache_dir
    from logitcast.server.fleet import free_port

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    work = args.workdir
    for sub in ("cache", "runs", "tokens", "heldout", "students"):
        shutil.rmtree(work / sub, ignore_errors=True)
    t0 = time.perf_counter()
    tok, fingerprint, vocab = load_tokenizer("default")  # also builds the teacher cache once
    files = stdlib_source_files()
    train_files, held = files[:args.files], files[args.files:args.files + args.heldout_files]
    tokenize_sources(train_files, work / "tokens", tok, fingerprint, vocab_size=vocab)
    tokenize_sources(held, work / "heldout", tok, fingerprint, vocab_size=vocab)
    train, heldout = TokenCorpus(work / "tokens"), TokenCorpus(work / "heldout")
    need = args.steps * args.batch * args.seq_len
    print(f"[1/7] corpus: {train.num_documents} stdlib files, {train.num_tokens} tokens for "
          f"training ({need} per student), {heldout.num_tokens} held out "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)

    pruned = not args.from_scratch
    alpha = args.alpha
    lr = args.lr if args.lr is not None else (1e-3 if pruned else 3e-3)
    if pruned:
        print(f"[2/7] students pruned from the teacher: A and the baseline keep {args.layers} "
              f"blocks, B {args.small_layers}", flush=True)
        student_a = {"student.path": str(_prune(work, "a", args.layers)),
                     "student.freeze_embeddings": True}
        student_b = {"student.path": str(_prune(work, "b", args.small_layers)),
                     "student.freeze_embeddings": True}
    else:
        print(f"[2/7] students from scratch: A and the baseline {args.student}, B "
              f"{args.small_student}", flush=True)
        student_a, student_b = {"student.preset": args.student}, \
            {"student.preset": args.small_student}

    cache = (work / "cache").resolve()
    # On a CPU the teacher and student A share the cores. By default the teacher gets every
    # core and the student one thread (the teacher is the bottleneck): on 2 cores a whole
    # demo of 60 steps took 827 s this way and 918 s with both on every core; 40 steps, 561 s.
    cores = torch.get_num_threads()
    teacher_threads = args.teacher_threads or cores
    student_threads = max(1, cores - teacher_threads)
    server_metrics = free_port()
    proc, address, info = start_server_process(
        ["--model", "default", "--metrics-port", str(server_metrics), "--cache-dir", str(cache),
         "--replica-id", "demo", "--device", device, "--drain-grace-s", "30",
         "--dtype", "fp32" if device == "cpu" else "bf16"],  # bf16 matmuls are slow on CPUs
        work / "server.log", threads=teacher_threads)
    print(f"[3/7] teacher {info.teacher_id} serving on {address} ({device}); teeing into "
          f"{cache}; metrics http://127.0.0.1:{server_metrics}/metrics", flush=True)

    rs12 = {"method": "sample", "unique": 12.0}
    base = {"steps": args.steps, "data.train_tokens": str(work / "tokens"),
            "data.eval_tokens": str(work / "heldout"), "data.seq_len": args.seq_len,
            "data.global_batch": args.batch, **student_a,
            "eval.every": args.eval_every, "eval.rows": args.eval_rows, "metrics_port": 0,
            "optim.lr": {"name": "cosine", "peak": lr, "warmup_frac": 0.1, "floor": lr / 10},
            "loss.alpha": {"name": "constant", "value": alpha}, "teacher.spec": rs12,
            "export_tokenizer": str(default_cache_dir())}
    results = []
    try:
        print("[4/7] student A, online: RS-12 targets streamed from the teacher", flush=True)
        if device == "cpu":
            torch.set_num_threads(student_threads)
        results.append(_train("A online RS-12", {
            "output_dir": str(work / "runs" / "online"), "teacher.source": "online",
            "teacher.addresses": [address]}, base))
    finally:
        torch.set_num_threads(cores)
        proc.send_signal(signal.SIGTERM)  # drain: finish in-flight work, flush the tee
        proc.wait(timeout=120)
    print("[5/7] student B, offline: the same rows from the cache, no teacher running",
          flush=True)
    results.append(_train("B offline RS-12", {
        "output_dir": str(work / "runs" / "offline"), "teacher.source": "cache",
        "teacher.cache_dir": str(cache), **student_b}, base))
    print("[6/7] baseline: cross-entropy only, same rows and budget", flush=True)
    results.append(_train("CE only", {
        "output_dir": str(work / "runs" / "ce"), "teacher.source": "none", "eval.source": "cache",
        "teacher.cache_dir": str(cache)}, base))

    tokens = args.steps * args.batch * args.seq_len
    wire = results[0]["received"] / tokens
    on_disk = _namespace_bytes_per_token(cache, rs12, args.seq_len)
    print(f"[7/7] results after {args.steps} steps x {args.batch} x {args.seq_len} tokens "
          f"({time.perf_counter() - t0:.0f}s in all)\n")
    head = f"{'student':<18}{'params':>8}{'start LM':>10}{'heldout LM':>12}{'KL(T||S)':>10}" \
           f"{'ECE':>8}{'top1 agree':>12}{'tok/s':>8}{'bytes/tok':>11}"
    print(head)
    print("-" * len(head))
    floor = results[0]["final"].get("teacher_lm_loss")
    if floor is not None:  # the teacher's own loss on the same held-out rows
        print(f"{'teacher (floor)':<18}{'':>8}{'':>10}{floor:>12.3f}"
              f"{0.0:>10.3f}{'':>8}{1.0:>12.3f}{'':>8}{'':>11}")
    bytes_col = [f"{wire:.1f} wire", f"{on_disk:.1f} disk", "0"]
    for r, b in zip(results, bytes_col):
        f = r["final"]
        kl, agree = f.get("kl_to_teacher"), f.get("top1_agreement")
        start = next((e["lm_loss"] for e in r["log"] if e["kind"] == "eval"), float("nan"))
        print(f"{r['name']:<18}{r['params'] / 1e6:>7.1f}M{start:>10.3f}{f['lm_loss']:>12.3f}"
              f"{kl if kl is not None else float('nan'):>10.3f}{f['ece']:>8.3f}"
              f"{agree if agree is not None else float('nan'):>12.3f}{r['tok_s']:>8.0f}"
              f"{b:>11}")
    a, ce = results[0]["final"], results[2]["final"]
    if floor is not None:
        print(f"\nA (distilled) closes {_closed(a, ce, floor):.0%} of the baseline's distance to "
              f"the teacher's loss ({ce['lm_loss'] - a['lm_loss']:+.3f} nats vs CE, "
              f"{a['lm_loss'] - floor:.3f} above the floor)")
    plot = work / "eval_curves.png"
    summary = {"steps": args.steps, "tokens_per_student": tokens, "device": device,
               "wire_bytes_per_token": wire, "cache_bytes_per_token": on_disk,
               "teacher_lm_loss": floor, "pruned": pruned,
               "students": [{k: r[k] for k in ("name", "student", "params", "final", "tok_s",
                                               "seconds")} for r in results]}
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\neval curves: {plot if _plot(results, plot) else '(matplotlib missing: no plot)'}")
    print(f"summary: {work / 'summary.json'}; students: {work / 'runs'}/*/student; "
          f"target cache: {cache}; teacher log: {work / 'server.log'}")
    print("metrics: the teacher and each trainer served Prometheus /metrics at the URLs above "
          "while they ran")
    return 0 if all(r["final"] for r in results) else 1
