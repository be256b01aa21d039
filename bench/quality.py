"""Quality benchmark: do sparse targets distil as well as full logits, and better than top-k?

The real SmolLM2-135M teacher (fp32) and students pruned from it (`logitcast prune`'s
code: the most important blocks kept, the teacher's embedding and tied LM head kept
and frozen), trained on identical rows, one student per (method, seed):

    ce         cross-entropy only (no teacher)
    fullkd     dense KL to the full teacher distribution
    topk12     top-k 12, renormalised (vanilla top-k KD)      topk50   the same, k = 50
    tpk        top-p-k (0.95, 50), renormalised (PD)
    rs12       RS-KD: importance sampled, ~12 unique tokens (RS)
    headtail   exact top-4 head + sampled tail (~12 unique)
    tad        TAD: exact top-10 head, its tail term estimated from sampled tail tokens,
               beta = 2
    pd_better  PD's "better configuration": top-p-k (0.95, 50) at tau = 2, KLD,
               WSD-alpha (max 0.9) and WSD-LR, scaled to the run

A seed is a data order: the run draws one pool of packed rows and each seed trains on a
seeded permutation of it, so for a given seed every method sees the same rows in the
same order, and the only thing that differs between two students of one seed is the
method. Comparisons are therefore paired by seed: each method's difference to RS-12,
with a 95 % t interval over seeds (scipy), significant when the interval excludes 0.
The paired core (ce, fullkd, topk12, rs12, headtail) runs --seeds, the others
--extra-seeds.

Teacher targets for every spec come from one teacher forward per pooled batch and go
through the real target cache (`CacheWriter` -> `CacheSource`, keyed by row content,
so any order reads them back); FullKD reuses the same forward's last hidden state and
applies the teacher's LM head per step. Every student is evaluated at the end on the
same >= 128 held-out rows (split by source file) against the exact teacher
distribution: LM loss, KL(teacher || student), ECE, top-1 agreement, and mean
confidence minus accuracy (the over-confidence the RS paper attributes to top-k). The
teacher's own metrics on those rows are the floor. Every finished run is appended to
bench/results/quality-runs.jsonl: a rerun with the same configuration trains only the
runs still missing, and --report rewrites the report from that file alone.

    python bench/quality.py [--quick] [--corpus PATH] [--steps N] [--seeds 0,1,2,3,4]
                            [--report] [--fresh]

Results: bench/results/quality.{json,md,png}. Last line:
RESULT seeds=.. gap_rs12=.. gap_topk12=.. d_loss_topk12_vs_rs12=.. d_ece_topk12_vs_rs12=..
significant=..   (d = method - RS-12: positive means RS-12 is better)
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results

from logitcast.cache import CacheNamespace, CacheWriter
from logitcast.client.offline import CacheSource
from logitcast.data.packing import IGNORE, PackedBatch, Packer, PackingConfig
from logitcast.data.shards import TokenCorpus
from logitcast.ops import KDConfig, TargetSpec, alpha_at, fused_full_kd_loss, lr_at, sparsify
from logitcast.ops.codec import encode
from logitcast.ops.rowkey import draw_coordinates
from logitcast.trainer.objective import (
    add_position_sums,
    empty_sums,
    last_hidden,
    logit_stats,
    student_loss,
    summarize,
)
from logitcast.trainer.students import build_student, num_parameters

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "rs12"

SPECS = {
    "topk12": TargetSpec(method="topk", k=12),
    "topk50": TargetSpec(method="topk", k=50),
    "tpk": TargetSpec(method="top_p_k", p=0.95, k=50),
    "rs12": TargetSpec(method="sample", unique=12.0),
    "headtail": TargetSpec(method="head_tail", k_head=4, unique=12.0),
    "ht10": TargetSpec(method="head_tail", k_head=10, unique=12.0),
    "tpk_t2": TargetSpec(method="top_p_k", p=0.95, k=50, temperature=2.0),
}

#: name -> (spec key in SPECS, "full" or None, KD loss config)
STUDENTS = {
    "ce": (None, None),
    "fullkd": ("full", {}),
    "topk12": ("topk12", {"loss": "kl", "normalize": True}),
    "rs12": ("rs12", {"loss": "kl"}),
    "headtail": ("headtail", {"loss": "kl"}),
    "topk50": ("topk50", {"loss": "kl", "normalize": True}),
    "tpk": ("tpk", {"loss": "kl", "normalize": True}),
    "tad": ("ht10", {"loss": "tad", "beta": 2.0}),
    "pd_better": ("tpk_t2", {"loss": "kl", "normalize": True}),
}
CORE = ("ce", "fullkd", "topk12", "rs12", "headtail")
METRICS = ("lm_loss", "kl_to_teacher", "ece", "top1_agreement", "overconfidence")


# ---------------------------------------------------------------------------- data


def tokenize(corpus: str | None, work: Path, quick: bool):
    """(train corpus, held-out corpus, tokenizer fingerprint), split by source file."""
    from logitcast.cli.tokenize import load_tokenizer
    from logitcast.data.corpus import stdlib_source_files
    from logitcast.data.tokenize import list_sources, tokenize_sources

    tok, fingerprint, vocab = load_tokenizer("default")
    files = list_sources([Path(corpus)]) if corpus else stdlib_source_files()
    files = files[: 24 if quick else 400]
    if len(files) < 2:
        raise SystemExit(f"--corpus {corpus}: {len(files)} source file(s); the held-out split "
                         f"needs at least 2")
    held = files[::8]  # every 8th source file is held out
    train = [f for f in files if f not in held]
    tokenize_sources(train, work / "train", tok, fingerprint, vocab_size=vocab)
    tokenize_sources(held, work / "heldout", tok, fingerprint, vocab_size=vocab)
    return TokenCorpus(work / "train"), TokenCorpus(work / "heldout"), fingerprint


def row_pool(train: TokenCorpus, steps: int, batch: int, seq_len: int) -> PackedBatch:
    """The steps x batch rows every seed permutes (the trainer's packing, seed 0)."""
    packer = Packer(train, PackingConfig(seq_len=seq_len, global_batch=steps * batch))
    if packer.rows_per_epoch < steps * batch:
        raise SystemExit(f"the training split holds {packer.rows_per_epoch} rows of {seq_len} "
                         f"tokens; {steps} steps x {batch} rows need {steps * batch} distinct "
                         f"rows (a larger --corpus, or fewer --steps)")
    return packer.batch(0)


def heldout_rows(heldout: TokenCorpus, rows: int, seq_len: int) -> PackedBatch:
    packer = Packer(heldout, PackingConfig(seq_len=seq_len, global_batch=rows))
    if packer.rows_per_epoch < rows:
        raise SystemExit(f"the held-out split holds {packer.rows_per_epoch} rows of {seq_len} "
                         f"tokens; {rows} are needed (a larger --corpus)")
    return packer.batch(0)


@functools.lru_cache(maxsize=8)
def permutation(n: int, seed: int) -> torch.Tensor:
    """Seed `seed`'s data order over a pool of n rows."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def order(pool: PackedBatch, seed: int, step: int, batch: int) -> PackedBatch:
    """Step `step` of seed `seed`: `batch` rows of a seeded permutation of the pool."""
    rows = permutation(pool.input_ids.shape[0], seed)[step * batch:(step + 1) * batch]
    return PackedBatch(step=step, input_ids=pool.input_ids[rows], labels=pool.labels[rows],
                       document_ids=None, row_keys=tuple(pool.row_keys[i] for i in rows.tolist()))


# ---------------------------------------------------------------------------- teacher


def fill_cache(backend, pool: PackedBatch, batch: int, cache: Path, fingerprint: str) -> dict:
    """One teacher forward per pooled batch: every spec into the cache, hidden states kept."""
    writers = {name: CacheWriter(cache, CacheNamespace(
        teacher_id=backend.teacher_id, tokenizer_fingerprint=fingerprint, spec=spec),
        writer_id="quality") for name, spec in SPECS.items()}
    t0, hidden_pool = time.perf_counter(), []
    for start in range(0, pool.input_ids.shape[0], batch):
        tokens = pool.input_ids[start:start + batch]
        hidden = backend.hidden_states(tokens)
        hidden_pool.append(hidden)
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
    by_key = dict(zip(pool.row_keys, torch.cat(hidden_pool)))
    return {"seconds": time.perf_counter() - t0, "hidden": by_key,
            "namespaces": {name: w.namespace for name, w in writers.items()}}


@dataclass
class TeacherEval:
    """The exact teacher on the held-out positions, computed once per invocation: fp16
    probabilities [N, V] (fp16 keeps [0, 1] to ~5e-4 relative, finer than the fp16
    log-probs this replaced), and from the fp32 log-probs, per position, sum_v p log p
    (fp64), the stored probabilities' sum and the argmax; plus the teacher's own metrics."""

    probs: torch.Tensor
    neg_entropy: torch.Tensor
    mass: torch.Tensor
    top1: torch.Tensor
    metrics: dict


def teacher_reference(backend, rows: PackedBatch, chunk_rows: int = 4) -> TeacherEval:
    n, labels = rows.input_ids.numel(), rows.labels.reshape(-1)
    probs = torch.empty(n, backend.vocab_size, dtype=torch.float16)
    neg_entropy, mass = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    top1, sums, at = torch.empty(n, dtype=torch.long), empty_sums(), 0
    for s in range(0, rows.input_ids.shape[0], chunk_rows):
        h = backend.hidden_states(rows.input_ids[s:s + chunk_rows])
        h = h.reshape(-1, h.shape[-1])
        for i in range(0, h.shape[0], 256):
            logp = torch.log_softmax(backend.logits(h[i:i + 256]).float(), -1)
            sl = slice(at, at + logp.shape[0])
            p = logp.exp()
            neg_entropy[sl] = torch.bmm(p.unsqueeze(1), logp.unsqueeze(2)).view(-1).double()
            probs[sl] = p
            mass[sl] = probs[sl].sum(-1, dtype=torch.float64)
            top_logp, top1[sl] = logp.max(-1)
            lab = labels[sl]
            keep = lab != IGNORE
            label_logp = logp.gather(1, torch.where(keep, lab, 0)[:, None])[:, 0]
            add_position_sums(sums, top_logp[keep], top1[sl][keep], label_logp[keep], lab[keep])
            sums["n_teacher"] += keep.sum()
            sums["agree"] += keep.sum()  # KL to itself: 0
            at = sl.stop
    return TeacherEval(probs, neg_entropy, mass, top1, _metrics(sums))


# ---------------------------------------------------------------------------- metrics


def _metrics(sums: dict) -> dict:
    r = summarize(sums)
    return {k: r[k] for k in ("lm_loss", "kl_to_teacher", "ece", "top1_agreement",
                              "accuracy", "confidence", "overconfidence")}


@torch.no_grad()
def evaluate(model, rows: PackedBatch, teacher: TeacherEval, *, chunk_rows: int = 8,
             chunk: int = 512) -> dict:
    """Metrics of `model` on the held-out rows against the exact teacher: the trainer's
    eval sums (`logit_stats`, `add_position_sums`, `summarize`) with KL(teacher || student)
    and top-1 agreement from the teacher's full distribution. Per chunk of positions: the
    head matmul into a reused buffer, one batched dot with the teacher's probabilities, and
    `logit_stats`' two passes; KL = sum p log p - (p . z - lse * sum p)."""
    sums, seq = empty_sums(), rows.input_ids.shape[1]
    weight = model.get_output_embeddings().weight.float()
    z_buf = torch.empty(chunk, weight.shape[0])
    p_buf = torch.empty(chunk, weight.shape[0])
    for s in range(0, rows.input_ids.shape[0], chunk_rows):
        ids = rows.input_ids[s:s + chunk_rows]
        labels = rows.labels[s:s + ids.shape[0]].reshape(-1)
        hidden = last_hidden(model, ids).float()
        for i in range(0, labels.numel(), chunk):
            lab = labels[i:i + chunk]
            m, at = lab.numel(), s * seq + i
            tsl = slice(at, at + m)
            keep = lab != IGNORE
            z = torch.mm(hidden[i:i + m], weight.T, out=z_buf[:m])
            p = p_buf[:m].copy_(teacher.probs[tsl])
            dot = torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(m).double()
            top_logp, top1, label_logp, lse = logit_stats(z, torch.where(keep, lab, 0))
            add_position_sums(sums, top_logp[keep], top1[keep], label_logp[keep], lab[keep])
            kl = teacher.neg_entropy[tsl] - (dot - lse.double() * teacher.mass[tsl])
            sums["n_teacher"] += keep.sum()
            sums["kl"] += kl[keep].sum()
            sums["agree"] += (top1 == teacher.top1[tsl])[keep].sum()
    return _metrics(sums)


def paired(runs: dict, name: str, metric: str, ref: str = REFERENCE) -> dict | None:
    """name - ref per seed (paired by data order): mean, 95 % t interval, p, significance."""
    a = {r["seed"]: r["final"][metric] for r in runs.get(name, [])}
    b = {r["seed"]: r["final"][metric] for r in runs.get(ref, [])}
    seeds = sorted(set(a) & set(b))
    if name == ref or not seeds:
        return None
    d = np.array([a[s] - b[s] for s in seeds])
    out = {"seeds": seeds, "per_seed": d.tolist(), "mean": float(d.mean())}
    if len(d) < 2 or np.all(d == d[0]):
        out.update(ci95=[float("nan")] * 2, p=float("nan"), significant=False,
                   seeds_agree=bool(len(d) > 0 and (np.all(d > 0) or np.all(d < 0))))
        return out
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    lo, hi = out["mean"] - half, out["mean"] + half
    out.update(ci95=[lo, hi], p=float(stats.ttest_1samp(d, 0.0).pvalue),
               significant=bool(lo > 0 or hi < 0),
               seeds_agree=bool(np.all(d > 0) or np.all(d < 0)))
    return out


def summarize_runs(runs: dict) -> dict:
    """Per method: mean/sd of final metrics over seeds, the paired differences to RS-12,
    and the gap covered, (CE - x) / (CE - FullKD) on the method's own seeds, when the
    CE -> FullKD difference is clearly resolved."""
    out: dict = {"methods": {}, "paired": {}}
    for name, rs in runs.items():
        row = {"seeds": [r["seed"] for r in rs]}
        for key in (*METRICS, "accuracy", "confidence"):
            vals = np.array([r["final"][key] for r in rs])
            row[key], row[f"{key}_sd"] = float(vals.mean()), float(vals.std(ddof=1)) \
                if len(vals) > 1 else float("nan")
        row["tokens_per_s"] = float(np.mean([r["tokens_per_s"] for r in rs]))
        out["methods"][name] = row
        out["paired"][name] = {m: paired(runs, name, m) for m in METRICS}
    ce_full = paired(runs, "ce", "lm_loss", ref="fullkd")
    resolved = bool(ce_full and len(ce_full["per_seed"]) > 1 and ce_full["mean"] >=
                    5 * np.std(ce_full["per_seed"], ddof=1))
    out["ce_minus_fullkd"] = ce_full
    out["gap_resolved"] = resolved
    loss = {n: {r["seed"]: r["final"]["lm_loss"] for r in rs} for n, rs in runs.items()}
    for name, row in out["methods"].items():
        # paired: CE and FullKD over this method's own seeds (the others use fewer seeds)
        seeds = sorted(set(loss[name]) & set(loss["ce"]) & set(loss["fullkd"]))
        ce = np.mean([loss["ce"][s] for s in seeds]) if seeds else float("nan")
        full = np.mean([loss["fullkd"][s] for s in seeds]) if seeds else float("nan")
        x = np.mean([loss[name][s] for s in seeds]) if seeds else float("nan")
        row["gap"] = float((ce - x) / (ce - full)) if resolved and seeds else float("nan")
    return out


# ---------------------------------------------------------------------------- students


def base_student(backend, args, train: TokenCorpus) -> tuple[torch.nn.Module, dict]:
    """The initial student every run copies: pruned from the teacher, or a preset."""
    if not args.student.startswith("pruned:"):
        return build_student(preset=args.student, vocab_size=backend.vocab_size,
                             init_seed=0), {"kind": "from scratch", "preset": args.student}
    from logitcast.trainer.prune import PruneSpec, calibration_rows, prune

    layers = int(args.student.split(":", 1)[1])
    calib = calibration_rows(train, 8, args.seq_len)
    pruned = prune(copy.deepcopy(backend.model), PruneSpec(layers=layers), calib)
    model = pruned.model.float().train().requires_grad_(True)
    # The teacher's embedding and (tied) LM head stay frozen: only blocks and norms train.
    model.get_input_embeddings().weight.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(False)
    return model, {"kind": "pruned from the teacher", "layers": layers,
                   "kept_layers": pruned.plan.layers, "frozen": "embedding + tied LM head"}


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


def train_student(name: str, seed: int, args, base, pool, heldout, teacher, backend,
                  filled, sources) -> dict:
    spec_name, kd = STUDENTS[name]
    started = time.perf_counter()
    student = copy.deepcopy(base)
    decay, rest = [], []
    for p in student.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else rest).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}], lr=0.0, betas=(0.9, 0.95))
    steps, batch = args.steps, args.batch
    alpha_of, lr_of = schedules(name, spec_name, steps, args)
    config = KDConfig(ignore_index=IGNORE, seq_len=args.seq_len, **(kd or {}))
    train_lm, seconds = [], 0.0
    for step in range(steps):
        b = order(pool, seed, step, batch)
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_of(step)
        alpha = alpha_of(step)
        if spec_name == "full":
            t_hidden = torch.stack([filled["hidden"][k] for k in b.row_keys])
            hidden = last_hidden(student, b.input_ids)
            loss, parts = fused_full_kd_loss(
                hidden, student.get_output_embeddings().weight, t_hidden.flatten(0, 1),
                backend.model.lm_head.weight, b.labels.reshape(-1), alpha=alpha,
                ignore_index=IGNORE)
        else:
            targets = None if spec_name is None else sources[spec_name].fetch(b).targets
            loss, parts = student_loss(student, b.input_ids, b.labels, targets, alpha=alpha,
                                       config=config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decay + rest, 1.0)
        opt.step()
        seconds += time.perf_counter() - t0
        train_lm.append(float(parts["lm"]))
    student.eval()
    final = evaluate(student, heldout, teacher)
    tok_s = steps * batch * args.seq_len / seconds
    print(f"  {name:>10} seed {seed}: held-out LM {final['lm_loss']:.4f}, KL "
          f"{final['kl_to_teacher']:.4f}, ECE {final['ece']:.4f}, top-1 "
          f"{final['top1_agreement']:.3f}, over-conf {final['overconfidence']:+.4f} "
          f"({tok_s:.0f} tok/s)", flush=True)
    return {"kind": "run", "name": name, "seed": seed, "final": final, "train_lm": train_lm,
            "tokens_per_s": tok_s, "wall_s": time.perf_counter() - started,
            "params": num_parameters(student),
            "trainable_params": sum(p.numel() for p in decay + rest)}


# ---------------------------------------------------------------------------- report


def _fmt_paired(d: dict | None, digits: int = 4) -> str:
    if d is None:
        return "—"
    lo, hi = d["ci95"]
    mark = " **✓**" if d["significant"] else ""
    agree = "" if d["seeds_agree"] else " (seeds disagree)"
    return f"{d['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{mark}{agree}"


def markdown(summary: dict, meta: dict) -> str:
    m, teacher = summary["methods"], meta["teacher_metrics"]
    lines = [f"# Distillation quality ({meta['teacher']}; students {meta['student']['kind']}"
             f", {meta['student_params'] / 1e6:.1f}M params, "
             f"{meta['trainable_params'] / 1e6:.1f}M trained; {meta['steps']} steps x "
             f"{meta['tokens_per_step']} tokens; {meta['heldout_rows']} held-out rows)", "",
             "## Final held-out metrics (mean ± sd over seeds)", "",
             "| model | seeds | LM loss | KL(T‖S) | ECE | top-1 agreement | conf − acc | "
             "gap covered | tok/s |", "|---|---|---|---|---|---|---|---|---|",
             f"| teacher (floor) | – | {teacher['lm_loss']:.4f} | 0 | {teacher['ece']:.4f} | 1 | "
             f"{teacher['overconfidence']:+.4f} | – | – |",
             f"| start (pruned, untrained) | – | {meta['start_metrics']['lm_loss']:.4f} | "
             f"{meta['start_metrics']['kl_to_teacher']:.4f} | {meta['start_metrics']['ece']:.4f}"
             f" | {meta['start_metrics']['top1_agreement']:.3f} | "
             f"{meta['start_metrics']['overconfidence']:+.4f} | – | – |"]
    for name, r in m.items():
        gap = "n/a" if np.isnan(r["gap"]) else f"{100 * r['gap']:.0f}%"
        lines.append(
            f"| {name} | {len(r['seeds'])} | {r['lm_loss']:.4f} ± {r['lm_loss_sd']:.4f} | "
            f"{r['kl_to_teacher']:.4f} ± {r['kl_to_teacher_sd']:.4f} | {r['ece']:.4f} ± "
            f"{r['ece_sd']:.4f} | {r['top1_agreement']:.4f} | {r['overconfidence']:+.4f} | "
            f"{gap} | {r['tokens_per_s']:.0f} |")
    cf = summary["ce_minus_fullkd"]
    lines += ["", f"CE − FullKD on LM loss, paired: {_fmt_paired(cf)}; gap covered = "
              f"(CE − x) / (CE − FullKD), means over the method's own seeds, is reported only "
              f"when that difference is ≥ 5× its sd over seeds: "
              f"{'yes' if summary['gap_resolved'] else 'no, so n/a'}.", "",
              "## Paired differences to RS-12 (method − RS-12, per seed; mean [95 % t "
              "interval]; **✓** = significant)", "",
              "A positive Δ in LM loss, KL or ECE means RS-12 is better, and so does a positive "
              "Δ conf − acc between over-confident students; for top-1 agreement a negative Δ "
              "does.",
              "",
              "| method | seeds | Δ LM loss | Δ KL(T‖S) | Δ ECE | Δ top-1 agreement | "
              "Δ conf − acc |", "|---|---|---|---|---|---|---|"]
    for name, ds in summary["paired"].items():
        if ds["lm_loss"] is None:
            continue
        lines.append(f"| {name} | {len(ds['lm_loss']['seeds'])} | " +
                     " | ".join(_fmt_paired(ds[k]) for k in METRICS) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for name, rs in runs.items():
        curves = [r["train_lm"] for r in rs if "train_lm" in r]
        if curves:  # the LM part of each step's loss, mean over seeds, smoothed over 10 steps
            mean = np.convolve(np.mean(curves, axis=0), np.ones(10) / 10, mode="valid")
            axes[0].plot(np.arange(len(mean)) + 10, mean, label=name)
    axes[0].set_title("training LM loss (next-token CE on the step's rows), mean over seeds")
    axes[0].set_xlabel("step")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    for ax, key in zip(axes[1:], ("lm_loss", "ece")):
        names = [n for n, ds in summary["paired"].items() if ds[key] is not None]
        means = [summary["paired"][n][key]["mean"] for n in names]
        errs = [summary["paired"][n][key]["mean"] - summary["paired"][n][key]["ci95"][0]
                for n in names]
        ax.barh(names, means, xerr=np.nan_to_num(errs), color=[
            "tab:green" if summary["paired"][n][key]["significant"] else "tab:gray"
            for n in names])
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(f"{key}: method − RS-12, paired, 95 % CI (green: significant)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def load_progress(path: Path) -> tuple[dict | None, dict]:
    """(setup record or None, {(name, seed): run}) from a progress file."""
    setup, done = None, {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: that run reruns
                continue
            if r.get("kind") == "setup":
                setup = r
            elif r.get("kind") == "run":
                done[(r["name"], r["seed"])] = r
    return setup, done


def append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def plan(names: list[str], seeds: list[int], extra: list[int]) -> list[tuple[str, int]]:
    """The paired core over the first 3 seeds, then the other methods over theirs, then
    the core's remaining seeds (a run stopped early still has every method twice)."""
    def core(ss):
        return [(n, s) for s in ss for n in names if n in CORE]
    return core(seeds[:3]) + [(n, s) for s in extra for n in names if n not in CORE] + \
        core(seeds[3:])


def train_all(args, config: dict, setup: dict | None, todo: list, done: dict, progress: Path,
              rows: int) -> dict:
    """Set up (teacher targets, held-out log-probs) and train every (method, seed) in
    `todo`, appending each finished run to `progress`; returns the setup record."""
    from logitcast.server.backends import TransformersBackend

    work = Path(tempfile.mkdtemp(prefix="lc-quality-"))
    try:
        train, heldout, fingerprint = tokenize(args.corpus, work, args.quick)
        pool = row_pool(train, args.steps, args.batch, args.seq_len)
        held = heldout_rows(heldout, rows, args.seq_len)
        backend = TransformersBackend.from_pretrained("default", dtype="fp32")
        base, student_meta = base_student(backend, args, train)
        print(f"corpus: {train.num_tokens} train tokens, {heldout.num_tokens} held out; "
              f"{args.steps} steps x {args.batch * args.seq_len} tokens per student; "
              f"student {student_meta}; {len(todo)} runs to go", flush=True)
        filled = fill_cache(backend, pool, args.batch, work / "cache", fingerprint)
        teacher = teacher_reference(backend, held)
        if setup is None:
            base.eval()
            meta = {"teacher": backend.teacher_id, "steps": args.steps,
                    "student": student_meta, "tokens_per_step": args.batch * args.seq_len,
                    "seq_len": args.seq_len, "heldout_rows": rows,
                    "corpus": args.corpus or "python stdlib source", "alpha": args.alpha,
                    "peak_lr": args.lr, "teacher_metrics": teacher.metrics,
                    "start_metrics": evaluate(base, held, teacher),
                    "cache_fill_seconds": filled["seconds"]}
            base.train()
            setup = {"kind": "setup", "config": config, "meta": meta}
            append(progress, setup)
        print(f"teacher targets for {len(SPECS)} specs in {filled['seconds']:.0f}s; teacher "
              f"held-out LM {setup['meta']['teacher_metrics']['lm_loss']:.4f}; untrained "
              f"student {setup['meta']['start_metrics']['lm_loss']:.4f}", flush=True)
        sources = {name: CacheSource(work / "cache", ns, prefetch=1)
                   for name, ns in filled["namespaces"].items()}
        try:
            for name, seed in todo:
                r = train_student(name, seed, args, base, pool, held, teacher, backend,
                                  filled, sources)
                append(progress, r)
                done[(name, seed)] = r
        finally:
            for s in sources.values():
                s.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return setup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--corpus", default=None, help="text directory, text file or JSONL")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seeds", default=None, help="data-order seeds of the paired core")
    p.add_argument("--extra-seeds", default=None, help="data-order seeds of the other methods")
    p.add_argument("--student", default=None,
                   help="pruned:N (N teacher blocks kept; default pruned:4) or a preset "
                        "trained from scratch (tiny-16m, ...)")
    p.add_argument("--only", default=None, help="comma-separated methods to run")
    p.add_argument("--fresh", action="store_true", help="discard the finished runs")
    p.add_argument("--report", action="store_true",
                   help="only write the report from the finished runs (no teacher, no training)")
    args = p.parse_args()
    q = args.quick
    args.steps = args.steps or (6 if q else 100)
    seeds = [int(s) for s in (args.seeds or ("0,1" if q else "0,1,2,3,4")).split(",")]
    extra = [int(s) for s in (args.extra_seeds or ("0" if q else "0,1")).split(",")]
    args.student = args.student or "pruned:4"
    args.seq_len, args.batch = (64, 2) if q else (256, 2)
    rows = 8 if q else 128
    args.lr, args.alpha = 3e-4, 0.5
    names = args.only.split(",") if args.only else list(STUDENTS)
    unknown = sorted(set(names) - set(STUDENTS))
    if unknown:
        p.error(f"--only: unknown methods {unknown}; known: {list(STUDENTS)}")
    for needed in ("ce", "fullkd", REFERENCE):
        if needed not in names:
            names.insert(0, needed)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    config = {"version": 2, "steps": args.steps, "student": args.student, "seq": args.seq_len,
              "batch": args.batch, "rows": rows, "corpus": args.corpus, "lr": args.lr,
              "alpha": args.alpha, "quick": q}
    suffix = "-quick" if q else ""
    progress = RESULTS / f"quality{suffix}-runs.jsonl"
    if args.fresh or q:  # --quick always starts over
        progress.unlink(missing_ok=True)
    setup, done = load_progress(progress)
    if setup is not None and setup["config"] != config:
        p.error(f"{progress} holds runs of another configuration ({setup['config']}); "
                f"pass --fresh to start over")
    todo = [(n, i) for n, i in plan(names, seeds, extra) if (n, i) not in done]
    if args.report:
        if setup is None:
            p.error(f"--report: {progress} has no finished setup; run the benchmark first")
        todo = []
    t_start = time.perf_counter()
    if todo:
        setup = train_all(args, config, setup, todo, done, progress, rows)
    runs: dict[str, list] = {}
    for n, i in plan(names, seeds, extra):
        if (n, i) in done:
            runs.setdefault(n, []).append(done[(n, i)])
    missing = [f"{n}/{i}" for n, i in plan(names, seeds, extra) if (n, i) not in done]
    summary = summarize_runs(runs)
    first = runs["ce"][0]
    meta = {**setup["meta"], "student_params": first["params"],
            "trainable_params": first["trainable_params"],
            "seeds": sorted({r["seed"] for r in runs[REFERENCE]}), "extra_seeds": extra,
            "planned_seeds": seeds, "missing_runs": missing,
            "seconds_this_invocation": time.perf_counter() - t_start,
            "progress_file": str(progress.relative_to(ROOT))}
    (RESULTS / f"quality{suffix}.md").write_text(markdown(summary, meta))
    plot(runs, summary, RESULTS / f"quality{suffix}.png")
    path = write_results("quality", {"config": meta, "summary": summary,
                                     "runs": {n: [r["final"] | {"seed": r["seed"]} for r in rs]
                                              for n, rs in runs.items()}}, suffix=suffix)
    print(markdown(summary, meta))
    print(f"results: {path}")
    pr, m = summary["paired"], summary["methods"]
    sig = [k for k, metric in (("loss", "lm_loss"), ("ece", "ece"))
           if pr["topk12"][metric] and pr["topk12"][metric]["significant"]
           and pr["topk12"][metric]["mean"] > 0] if "topk12" in pr else []

    def d(name: str, metric: str) -> float:
        return pr[name][metric]["mean"] if name in pr and pr[name][metric] else float("nan")

    print(f"RESULT seeds={len(meta['seeds'])} gap_rs12={m['rs12']['gap']:.4f} "
          f"gap_topk12={m['topk12']['gap'] if 'topk12' in m else float('nan'):.4f} "
          f"d_loss_topk12_vs_rs12={d('topk12', 'lm_loss'):.4f} "
          f"d_ece_topk12_vs_rs12={d('topk12', 'ece'):.4f} "
          f"d_loss_headtail_vs_rs12={d('headtail', 'lm_loss'):.4f} "
          f"significant={'+'.join(sig) or 'none'}")


if __name__ == "__main__":
    main()
