"""Quality benchmark: which sparse targets and losses distil best, on the real teacher?

The real SmolLM2-135M teacher, a corpus (default: the Python standard library
source; --corpus DIR|FILE for text files or JSONL), a held-out split by source
file, and ~16M-parameter students trained from scratch on identical rows in
identical order, one per method:

    ce         cross-entropy only (no teacher)
    fullkd     dense KL to the full teacher distribution (the ceiling)
    topk12     top-k 12, renormalised (vanilla top-k KD)      topk50   the same, k = 50
    tpk        top-p-k (0.95, 50), renormalised (PD)
    rs12       RS-KD: importance sampled, ~12 unique tokens (RS)
    headtail   exact top-4 head + sampled tail (~12 unique)
    ghost      top-k 12 + a ghost token for the rest
    tad        TAD: exact top-10 head, its tail term estimated from sampled tail
               tokens (head_tail, K = 10), beta = 2
    pd_better  PD's "better configuration": top-p-k (0.95, 50) at tau = 2, KLD,
               WSD-alpha (max 0.9) and WSD-LR

Teacher targets for every sparse spec are computed once, from one teacher
forward per batch, and written into a target cache (the real format); every
student reads them back through `CacheSource`. FullKD runs the teacher on the
fly. Each student is evaluated on the same held-out rows against the exact
teacher distribution: LM loss, the fraction of the CE -> FullKD held-out-loss
gap it covers, ECE, top-1 agreement, KL(teacher || student), and tokens/s.
Results: bench/results/quality.json, quality.md and quality.png (eval curves),
mean +- spread over the seeds (student initialisations; the data order is fixed).

    python bench/quality.py [--quick] [--corpus PATH] [--steps N] [--seeds 0,1]

Last line: RESULT gap_rs12=.. gap_topk12=.. gap_headtail=.. ece_rs12=.. ece_topk12=.. ece_fullkd=..
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results

from logitcast.cache import CacheNamespace, CacheWriter
from logitcast.client.offline import CacheSource
from logitcast.client.packing import IGNORE, Packer, PackingConfig
from logitcast.client.shards import TokenCorpus
from logitcast.ops import KDConfig, TargetSpec, alpha_at, full_kd_loss, lr_at, sparsify
from logitcast.ops.codec import encode
from logitcast.ops.rowkey import draw_coordinates
from logitcast.trainer.objective import evaluate_batch, last_hidden, student_loss, summarize
from logitcast.trainer.students import build_student, num_parameters

SPECS = {
    "topk12": TargetSpec(method="topk", k=12),
    "topk50": TargetSpec(method="topk", k=50),
    "tpk": TargetSpec(method="top_p_k", p=0.95, k=50),
    "rs12": TargetSpec(method="sample", unique=12.0),
    "headtail": TargetSpec(method="head_tail", k_head=4, unique=12.0),
    "ht10": TargetSpec(method="head_tail", k_head=10, unique=12.0),
    "tpk_t2": TargetSpec(method="top_p_k", p=0.95, k=50, temperature=2.0),
}

#: name -> (spec key in SPECS or None/"full", KD loss config, schedules)
STUDENTS = {
    "ce": (None, None),
    "fullkd": ("full", {}),
    "topk12": ("topk12", {"loss": "kl", "normalize": True}),
    "topk50": ("topk50", {"loss": "kl", "normalize": True}),
    "tpk": ("tpk", {"loss": "kl", "normalize": True}),
    "rs12": ("rs12", {"loss": "kl"}),
    "headtail": ("headtail", {"loss": "kl"}),
    "ghost": ("topk12", {"loss": "ghost"}),
    "tad": ("ht10", {"loss": "tad", "beta": 2.0}),
    "pd_better": ("tpk_t2", {"loss": "kl", "normalize": True}),
}


def tokenize(corpus: str | None, work: Path, quick: bool):
    """(train corpus, held-out corpus, tokenizer fingerprint), split by source file."""
    from logitcast.cli.tokenize import load_tokenizer
    from logitcast.client.corpus import stdlib_source_files
    from logitcast.client.tokenize import list_sources, tokenize_sources

    tok, fingerprint, vocab = load_tokenizer("default")
    files = list_sources([Path(corpus)]) if corpus else stdlib_source_files()
    files = files[: 12 if quick else 80]
    held = files[::8]  # every 8th source file is held out
    train = [f for f in files if f not in held]
    tokenize_sources(train, work / "train", tok, fingerprint, vocab_size=vocab)
    tokenize_sources(held, work / "heldout", tok, fingerprint, vocab_size=vocab)
    return TokenCorpus(work / "train"), TokenCorpus(work / "heldout"), fingerprint


def fill_cache(backend, packer: Packer, steps: int, cache: Path, fingerprint: str) -> dict:
    """One teacher forward per batch, every spec sparsified from it, into the cache."""
    writers = {name: CacheWriter(cache, CacheNamespace(
        teacher_id=backend.teacher_id, tokenizer_fingerprint=fingerprint, spec=spec),
        writer_id="quality") for name, spec in SPECS.items()}
    t0 = time.perf_counter()
    for step in range(steps):
        batch = packer.batch(step)
        tokens = batch.input_ids
        hidden = backend.hidden_states(tokens)
        labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], dim=1)
        seq = tokens.shape[1]
        keys, draw, pos = draw_coordinates(tokens)
        for r in range(tokens.shape[0]):
            logits = backend.logits(hidden[r])
            span = slice(r * seq, (r + 1) * seq)
            for name, spec in SPECS.items():
                t = sparsify(logits, spec, row_keys=draw[span], positions=pos[span],
                             labels=labels[r], entropy=False)
                writers[name].put(keys[r], encode(t))
    for w in writers.values():
        w.close()
    return {"seconds": time.perf_counter() - t0,
            "namespaces": {name: w.namespace for name, w in writers.items()}}


def teacher_eval_logprobs(backend, batch) -> torch.Tensor:
    """fp16 [rows*T, V] teacher log-probs of the held-out rows (computed once)."""
    hidden = backend.hidden_states(batch.input_ids)
    h = hidden.reshape(-1, hidden.shape[-1])
    return torch.cat([torch.log_softmax(backend.logits(h[i:i + 256]), -1).half()
                      for i in range(0, h.shape[0], 256)])


@torch.no_grad()
def evaluate(student, batch, teacher_logp: torch.Tensor) -> dict:
    """LM loss, ECE, accuracy (our eval) + exact KL and top-1 agreement vs the teacher."""
    out = summarize(evaluate_batch(student, batch.input_ids, batch.labels, None))
    hidden = last_hidden(student, batch.input_ids)
    head = student.get_output_embeddings()
    keep = batch.labels.reshape(-1) != IGNORE
    kl, agree, n = 0.0, 0, 0
    for i in range(0, hidden.shape[0], 256):
        k = keep[i:i + 256]
        logq = torch.log_softmax(head(hidden[i:i + 256][k]).float(), -1)
        logp = teacher_logp[i:i + 256][k].float()
        kl += float((logp.exp() * (logp - logq)).sum())
        agree += int((logq.argmax(-1) == logp.argmax(-1)).sum())
        n += int(k.sum())
    out.update(kl_to_teacher=kl / n, top1_agreement=agree / n)
    return out


def schedules(name: str, spec_name: str | None, steps: int, args):
    """(alpha(step), lr(step)): PD's WSD pair for pd_better, else constant alpha + cosine LR."""
    warm = round(0.1 * steps)

    if name == "pd_better":
        def alpha(s):
            return alpha_at(s, "wsd", total_steps=steps, peak=0.9, warmup_steps=warm,
                            decay_steps=max(1, round(0.01 * steps)))

        def lr(s):
            return lr_at(s, "wsd", total_steps=steps, peak=args.lr, warmup_steps=warm,
                         decay_steps=max(1, round(0.1 * steps)), floor=args.lr / 10)
        return alpha, lr

    def constant_alpha(s):
        return 0.0 if spec_name is None else args.alpha

    def cosine_lr(s):
        return lr_at(s, "cosine", total_steps=steps, peak=args.lr, warmup_steps=warm,
                     floor=args.lr / 10)
    return constant_alpha, cosine_lr


def train_student(name: str, seed: int, args, packer, eval_batch, teacher_logp, backend,
                  sources: dict) -> dict:
    spec_name, kd = STUDENTS[name]
    student = build_student(preset=args.student, vocab_size=backend.vocab_size,
                            init_seed=seed)
    decay, rest = [], []
    for p in student.parameters():
        (decay if p.dim() >= 2 else rest).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}], lr=0.0, betas=(0.9, 0.95))
    steps, seq = args.steps, args.seq_len
    alpha_of, lr_of = schedules(name, spec_name, steps, args)
    config = KDConfig(ignore_index=IGNORE, seq_len=seq, **(kd or {}))
    curve, seconds = [], 0.0
    for step in range(steps + 1):
        if step % args.eval_every == 0 or step == steps:
            curve.append({"step": step, **evaluate(student, eval_batch, teacher_logp)})
        if step == steps:
            break
        batch = packer.batch(step)
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_of(step)
        alpha = alpha_of(step)
        if spec_name == "full":
            with torch.no_grad():
                h = backend.hidden_states(batch.input_ids)
                t_logits = backend.logits(h.reshape(-1, h.shape[-1]))
            logits = student(batch.input_ids).logits.reshape(-1, t_logits.shape[-1])
            loss, _ = full_kd_loss(logits, t_logits, batch.labels.reshape(-1), alpha=alpha,
                                   ignore_index=IGNORE)
        else:
            targets = None if spec_name is None else sources[spec_name].fetch(batch).targets
            loss, _ = student_loss(student, batch.input_ids, batch.labels, targets,
                                   alpha=alpha, config=config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        seconds += time.perf_counter() - t0
    final = curve[-1]
    print(f"  {name:>10} seed {seed}: held-out LM {final['lm_loss']:.3f}, KL "
          f"{final['kl_to_teacher']:.3f}, ECE {final['ece']:.4f}, top-1 "
          f"{final['top1_agreement']:.3f} ({steps * packer.config.global_batch * seq / seconds:.0f}"
          f" tok/s)", flush=True)
    return {"curve": curve, "final": final, "params": num_parameters(student),
            "tokens_per_s": steps * packer.config.global_batch * seq / seconds}


def summarize_runs(runs: dict) -> dict:
    """Per student: mean and spread (max - min over seeds) of the final metrics, and gaps."""
    out = {}
    ce = np.mean([r["final"]["lm_loss"] for r in runs["ce"]])
    full = np.mean([r["final"]["lm_loss"] for r in runs["fullkd"]])
    for name, rs in runs.items():
        row = {}
        for key in ("lm_loss", "ece", "top1_agreement", "kl_to_teacher"):
            vals = [r["final"][key] for r in rs]
            row[key] = float(np.mean(vals))
            row[f"{key}_spread"] = float(np.max(vals) - np.min(vals))
        gaps = [(ce - r["final"]["lm_loss"]) / (ce - full) if ce != full else float("nan")
                for r in rs]
        row["gap"] = float(np.mean(gaps))
        row["gap_spread"] = float(np.max(gaps) - np.min(gaps))
        row["tokens_per_s"] = float(np.mean([r["tokens_per_s"] for r in rs]))
        out[name] = row
    return out


def markdown(summary: dict, meta: dict) -> str:
    lines = [f"# Distillation quality ({meta['teacher']}, {meta['steps']} steps x "
             f"{meta['tokens_per_step']} tokens, {meta['student']} students, seeds "
             f"{meta['seeds']})", "",
             "| student | held-out LM loss | gap covered | ECE | top-1 agreement | "
             "KL(T‖S) | tok/s |", "|---|---|---|---|---|---|---|"]
    for name, r in summary.items():
        lines.append(f"| {name} | {r['lm_loss']:.4f} ± {r['lm_loss_spread'] / 2:.4f} | "
                     f"{100 * r['gap']:.0f}% ± {100 * r['gap_spread'] / 2:.0f} | "
                     f"{r['ece']:.4f} | {r['top1_agreement']:.3f} | {r['kl_to_teacher']:.3f} | "
                     f"{r['tokens_per_s']:.0f} |")
    lines += ["", "± is half the spread (max - min) over seeds; gap = (CE - x) / (CE - FullKD) "
              "on held-out LM loss."]
    return "\n".join(lines) + "\n"


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for key, ax in zip(("lm_loss", "kl_to_teacher", "ece"), axes):
        for name, rs in runs.items():
            steps = [c["step"] for c in rs[0]["curve"]]
            mean = np.mean([[c[key] for c in r["curve"]] for r in rs], axis=0)
            ax.plot(steps, mean, marker=".", label=name)
        ax.set_title(f"held-out {key}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--corpus", default=None, help="text directory, text file or JSONL")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seeds", default=None, help="comma-separated student init seeds")
    p.add_argument("--student", default=None, help="student preset (default tiny-16m)")
    p.add_argument("--only", default=None, help="comma-separated students to run")
    args = p.parse_args()
    q = args.quick
    args.steps = args.steps or (6 if q else 120)
    seeds = [int(s) for s in (args.seeds or ("0" if q else "0,1")).split(",")]
    args.student = args.student or ("tiny-7m" if q else "tiny-16m")
    args.seq_len, batch = (64, 2) if q else (256, 4)
    args.eval_every = 3 if q else 20
    args.lr, args.alpha = 3e-3, 0.5
    names = args.only.split(",") if args.only else list(STUDENTS)
    for needed in ("ce", "fullkd"):
        if needed not in names:
            names.insert(0, needed)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    from logitcast.server.backends import TransformersBackend

    work = Path(tempfile.mkdtemp(prefix="lc-quality-"))
    try:
        train, heldout, fingerprint = tokenize(args.corpus, work, q)
        backend = TransformersBackend.from_pretrained("default", dtype="fp32")
        packer = Packer(train, PackingConfig(seq_len=args.seq_len, global_batch=batch))
        eval_batch = Packer(heldout, PackingConfig(seq_len=args.seq_len,
                                                   global_batch=2 if q else 8)).batch(0)
        print(f"corpus: {train.num_tokens} train tokens, {heldout.num_tokens} held out; "
              f"{args.steps} steps x {batch * args.seq_len} tokens per student", flush=True)
        filled = fill_cache(backend, packer, args.steps, work / "cache", fingerprint)
        print(f"teacher targets for {len(SPECS)} specs cached in {filled['seconds']:.0f}s",
              flush=True)
        teacher_logp = teacher_eval_logprobs(backend, eval_batch)
        sources = {name: CacheSource(work / "cache", ns, prefetch=1)
                   for name, ns in filled["namespaces"].items()}
        runs: dict[str, list] = {name: [] for name in names}
        t0 = time.perf_counter()
        for seed in seeds:
            for name in names:
                runs[name].append(train_student(name, seed, args, packer, eval_batch,
                                                teacher_logp, backend, sources))
        for s in sources.values():
            s.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize_runs(runs)
    suffix = "-quick" if q else ""
    meta = {"teacher": backend.teacher_id, "steps": args.steps, "student": args.student,
            "tokens_per_step": batch * args.seq_len, "seeds": seeds,
            "corpus": args.corpus or "python stdlib source", "alpha": args.alpha,
            "peak_lr": args.lr, "train_seconds": time.perf_counter() - t0,
            "cache_fill_seconds": filled["seconds"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"quality{suffix}.md").write_text(markdown(summary, meta))
    plot(runs, RESULTS / f"quality{suffix}.png")
    path = write_results("quality", {"config": meta, "summary": summary,
                                     "runs": {n: [{"final": r["final"], "curve": r["curve"]}
                                                  for r in rs] for n, rs in runs.items()}},
                         suffix=suffix)
    print(markdown(summary, meta))
    print(f"results: {path}")
    keys = {"gap_rs12": ("rs12", "gap"), "gap_topk12": ("topk12", "gap"),
            "gap_headtail": ("headtail", "gap"), "ece_rs12": ("rs12", "ece"),
            "ece_topk12": ("topk12", "ece"), "ece_fullkd": ("fullkd", "ece")}
    print("RESULT " + " ".join(f"{k}={summary[n][m]:.4f}" if n in summary else f"{k}=nan"
                               for k, (n, m) in keys.items()))


if __name__ == "__main__":
    main()
