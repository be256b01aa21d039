"""Difference-sampling benchmark: does MiniPLM's selection train better students, and is Score a prefill?

The real SmolLM2-135M teacher (fp32) served by a TeacherServer on 127.0.0.1, and a
reference pruned from it (2 blocks, `trainer.prune` as in bench/quality.py) trained
with CE on the reference split (the first --ref-split of the packed rows, excluded
from selection, as in the paper). `logitcast.data.select` scores every other row
(teacher through the real Score RPC, reference locally) and three corpora of the same
size are written with `write_corpus`, the output `logitcast select` produces:

    diff      top --ratio by log p_teacher - log p_reference (MiniPLM)
    uniform   a uniform sample of the candidates (seeded per seed)
    teacher   top --ratio by the teacher's log-prob alone (teacher-only top-alpha)

Each seed trains one student per corpus from the same pruned start (4 teacher blocks,
frozen embedding + tied head, like bench/quality.py) with plain CE on the corpus
packed by the trainer's `Packer` (seed = the packing seed): equal token budgets,
steps x batch x seq_len. Held-out LM loss (next-token CE on rows from the last
documents, held out) is compared paired by seed: diff - uniform and diff - teacher, 95 % t
intervals (scipy). Throughput: the teacher's Score RPC on loopback vs a bare teacher forward (the same
log-prob sums, `ModelScorer`) on the same first 192 candidate rows, prepared once,
both warm, interleaved in four blocks in ABBA order (score_vs_bare, with each block's
ratio; their sums are checked against each other and the select pass), and the whole
select pass's teacher side, which also reads and packs its rows and logs the scores as
it goes (select_vs_bare). The full run: 3 seeds,
60 steps x 2 x 256 tokens per student, ~500k characters of stdlib source (~35 min on
2 cores).

    python bench/selection.py [--quick] [--seeds 0,1,2] [--steps N]

Results: bench/results/select[-quick].json. Last line:
RESULT seeds=.. loss_diff=.. loss_uniform=.. loss_teacher=.. d_diff_vs_uniform=..
d_diff_vs_teacher=.. score_vs_bare=.. select_vs_bare=..   (d < 0: difference sampling trains better)
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results
from quality import base_student, paired

from logitcast.client.scorer import TeacherScorer
from logitcast.data.packing import Packer, PackingConfig
from logitcast.data.select import (
    Instances,
    ModelScorer,
    Scores,
    SelectConfig,
    reference_split,
    score_corpus,
    top_fraction,
    write_corpus,
)
from logitcast.data.shards import ShardWriter, TokenCorpus
from logitcast.ops import lr_at

METHODS = ("diff", "uniform", "teacher")
#: candidate rows the bare forward scores again for the throughput ratio
BARE_ROWS = 192


def corpora(work: Path, quick: bool, heldout_tokens: int):
    """(train corpus, held-out corpus): stdlib source documents; the last ones, at least
    `heldout_tokens` tokens, held out."""
    from logitcast.cli.tokenize import load_tokenizer
    from logitcast.data.corpus import stdlib_documents

    tok, fp, vocab = load_tokenizer("default")
    docs = [tok(text, add_special_tokens=False)["input_ids"]
            for text in stdlib_documents(max_chars=30_000 if quick else 500_000)]
    cut = len(docs)
    while cut > 1 and sum(len(d) + 1 for d in docs[cut:]) < heldout_tokens:
        cut -= 1
    for name, part in (("train", docs[:cut]), ("heldout", docs[cut:])):
        w = ShardWriter(work / name, fp, vocab, tok.eos_token_id)
        for d in part:
            w.add(d)
        w.commit_source("stdlib")
        w.flush()
    return TokenCorpus(work / "train"), TokenCorpus(work / "heldout")


class Timed:
    """A scorer wrapper that times its score_batches (and counts tokens)."""

    def __init__(self, inner):
        self.inner, self.seconds, self.tokens = inner, 0.0, 0
        for name in ("name", "tokenizer_fingerprint", "vocab_size", "max_rows", "max_tokens",
                     "max_seq_len"):
            setattr(self, name, getattr(inner, name))

    def score_batches(self, batches):
        t0 = time.perf_counter()
        for sums in self.inner.score_batches(self._count(batches)):
            self.seconds += time.perf_counter() - t0
            yield sums
            t0 = time.perf_counter()

    def _count(self, batches):
        for b in batches:
            self.tokens += b.size
            yield b


def train_ce(model, rows: torch.Tensor, steps: int, batch: int, lr: float) -> list[float]:
    """Plain next-token CE on rows [N, T] in order, `batch` rows a step; cosine LR."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    losses = []
    for step in range(steps):
        ids = rows[(step * batch + torch.arange(batch)) % rows.shape[0]]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, "cosine", total_steps=steps, peak=lr,
                                warmup_steps=max(1, steps // 10), floor=lr / 10)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def lm_loss(model, rows: torch.Tensor, chunk: int = 4) -> float:
    """Mean next-token CE (nats) over held-out rows [N, T]."""
    total, n = 0.0, 0
    for s in range(0, rows.shape[0], chunk):
        ids = rows[s:s + chunk]
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        n += ids[:, 1:].numel()
    return total / n


def packed_rows(corpus: TokenCorpus, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """The first n rows [n, T] the trainer's packer gives for `corpus` with `seed`."""
    packer = Packer(corpus, PackingConfig(seq_len=seq_len, global_batch=1, seed=seed))
    return torch.stack([packer.row(g)[0] for g in range(n)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--ratio", type=float, default=0.5)
    args = p.parse_args()
    q = args.quick
    seeds = [int(s) for s in (args.seeds or ("0,1" if q else "0,1,2")).split(",")]
    steps = args.steps or (4 if q else 60)
    seq, batch, ref_steps = (64, 2, 4) if q else (256, 2, 100)
    heldout_n, batch_tokens, lr = (8, 1024, 3e-4) if q else (128, 4096, 3e-4)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    from logitcast.server.app import TeacherServer
    from logitcast.server.backends import TransformersBackend
    from logitcast.server.engine import EngineConfig
    from logitcast.trainer.prune import PruneSpec, calibration_rows, prune

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="lc-select-"))
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        train, heldout = corpora(work, q, heldout_n * seq + seq)
        held = packed_rows(heldout, heldout_n, seq, 0)
        backend = TransformersBackend.from_pretrained("default", dtype="fp32")
        config = SelectConfig(ratio=args.ratio, seq_len=seq, reference_split=0.1,
                              batch_tokens=batch_tokens)
        instances = Instances(train, config)
        split = reference_split(instances.count, config.reference_split, config.seed)
        ref_rows = torch.stack([torch.from_numpy(instances.tokens(i)) for i in split])
        print(f"corpus: {train.num_tokens} train tokens = {instances.count} rows of {seq} "
              f"({split.size} reference split), {heldout_n} held-out rows", flush=True)

        # the reference: pruned to 2 blocks, CE on the reference split
        calib = calibration_rows(train, 8, seq)
        reference = prune(copy.deepcopy(backend.model), PruneSpec(layers=2), calib).model.float()
        reference.get_input_embeddings().weight.requires_grad_(False)
        reference.get_output_embeddings().weight.requires_grad_(False)
        ref_curve = train_ce(reference, ref_rows, ref_steps, batch, 1e-3)
        ref_scorer = ModelScorer(reference, name="pruned-2-blocks+ce-on-split",
                                 tokenizer_fingerprint=backend.tokenizer_fingerprint)

        # scoring: the teacher through the Score RPC, then a bare forward of the same rows
        server = asyncio.run_coroutine_threadsafe(TeacherServer.start(
            backend, port=0, engine_config=EngineConfig(max_batch_tokens=batch_tokens)),
            loop).result(120)
        with TeacherScorer([server.address], in_flight=4) as rpc:
            timed = Timed(rpc)
            scores = score_corpus(train, config, {"teacher": timed, "reference": ref_scorer},
                                  work / "scores", progress=False)
            cand = scores.candidates
            per = batch_tokens // seq
            sub = cand[:BARE_ROWS]  # a steady-state sample: the ratio is of throughputs
            same = [np.stack([instances.tokens(i) for i in sub[s:s + per]])
                    for s in range(0, sub.size, per)]
            # like for like: the RPC and the bare forward on the same prepared batches,
            # both warm (the select pass above also reads and packs its rows as it goes),
            # interleaved block by block in ABBA order so a drift of the shared machine's
            # speed falls on both alike
            rpc_same = Timed(rpc)
            bare = Timed(ModelScorer(backend.model, name="bare",
                                     tokenizer_fingerprint=backend.tokenizer_fingerprint))
            list(bare.inner.score_batches(same[:1]))  # warm-up, not timed
            n_blocks = min(4, len(same))
            edges = np.linspace(0, len(same), n_blocks + 1).round().astype(int)
            rpc_parts, bare_parts, block_ratios = [], [], []
            for j in range(n_blocks):
                part = same[edges[j]:edges[j + 1]]
                before = (rpc_same.seconds, bare.seconds)
                for who in ((rpc_same, bare) if j % 2 == 0 else (bare, rpc_same)):
                    sums = np.concatenate(list(who.score_batches(part)))
                    (rpc_parts if who is rpc_same else bare_parts).append(sums)
                block_ratios.append((bare.seconds - before[1]) / (rpc_same.seconds - before[0]))
            rpc_sums, bare_sums = np.concatenate(rpc_parts), np.concatenate(bare_parts)
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(120)
        agree = float(max(np.abs(bare_sums / (seq - 1) - scores.teacher[sub]).max(),
                          np.abs(rpc_sums - bare_sums).max() / (seq - 1)))
        select_tok_s = timed.tokens / timed.seconds
        rpc_tok_s, bare_tok_s = rpc_same.tokens / rpc_same.seconds, bare.tokens / bare.seconds
        print(f"scoring: Score RPC {rpc_tok_s:.0f} tok/s, bare forward {bare_tok_s:.0f} tok/s "
              f"on the same {len(sub)} rows (x{rpc_tok_s / bare_tok_s:.3f}); the whole select "
              f"pass (reading and packing rows, logging scores) {select_tok_s:.0f} tok/s "
              f"(x{select_tok_s / bare_tok_s:.3f}); max |per-token difference| {agree:.2e}; "
              f"per ABBA block x{', '.join(f'{r:.3f}' for r in block_ratios)}", flush=True)

        # three corpora of the same size, as logitcast select writes them
        kept = top_fraction(scores, args.ratio)
        teacher_only = Scores(scores.teacher, scores.teacher, scores.reference, scores.plan)
        top_teacher = top_fraction(teacher_only, args.ratio)
        base, student_meta = base_student(backend, argparse.Namespace(
            student="pruned:4", seq_len=seq), train)
        start_loss = lm_loss(base.eval(), held)
        runs: dict[str, list] = {m: [] for m in METHODS}
        for seed in seeds:
            uniform = np.sort(np.random.default_rng(seed).choice(cand, kept.size, replace=False))
            chosen = {"diff": kept, "uniform": uniform, "teacher": top_teacher}
            for name in METHODS:
                out = write_corpus(instances, chosen[name], work / f"{name}-{seed}", {})
                rows = packed_rows(TokenCorpus(out), min(steps * batch, Packer(
                    TokenCorpus(out), PackingConfig(seq_len=seq, global_batch=1)).rows_per_epoch),
                    seq, seed)
                t0 = time.perf_counter()
                student = copy.deepcopy(base)
                curve = train_ce(student, rows, steps, batch, lr)
                loss = lm_loss(student, held)
                runs[name].append({"seed": seed, "final": {"lm_loss": loss},
                                   "train_lm": curve, "wall_s": time.perf_counter() - t0})
                print(f"  {name:>8} seed {seed}: held-out LM {loss:.4f} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
                shutil.rmtree(out)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        shutil.rmtree(work, ignore_errors=True)

    mean = {m: float(np.mean([r["final"]["lm_loss"] for r in runs[m]])) for m in METHODS}
    d_uniform = paired(runs, "diff", "lm_loss", ref="uniform")
    d_teacher = paired(runs, "diff", "lm_loss", ref="teacher")
    payload = {
        "config": {"quick": q, "seeds": seeds, "steps": steps, "batch": batch, "seq_len": seq,
                   "tokens_per_student": steps * batch * seq, "ratio": args.ratio,
                   "reference_split": 0.1, "reference": "teacher pruned to 2 blocks, "
                   f"{ref_steps} CE steps on the split", "student": student_meta,
                   "heldout_rows": heldout_n, "candidates": int(cand.size),
                   "kept": int(kept.size), "train_tokens": train.num_tokens,
                   "wall_s": time.perf_counter() - t_start},
        "scoring": {"rpc_tok_s": rpc_tok_s, "bare_tok_s": bare_tok_s,
                    "score_vs_bare": rpc_tok_s / bare_tok_s, "block_ratios": block_ratios,
                    "select_tok_s": select_tok_s,
                    "select_vs_bare": select_tok_s / bare_tok_s, "rows": int(len(sub)),
                    "max_abs_diff_per_token": agree},
        "reference_train_lm": ref_curve, "start_lm_loss": start_loss,
        "mean_lm_loss": mean, "paired": {"diff_minus_uniform": d_uniform,
                                         "diff_minus_teacher": d_teacher},
        "runs": runs,
        "overlap": {"diff_and_teacher_top": float(np.isin(kept, top_teacher).mean())},
    }
    path = write_results("select", payload, suffix="-quick" if q else "")
    for name, d in (("uniform", d_uniform), ("teacher", d_teacher)):
        lo, hi = d["ci95"]
        print(f"diff - {name}: {d['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] per seed "
              f"{[round(x, 4) for x in d['per_seed']]}")
    print(f"results: {path} ({time.perf_counter() - t_start:.0f}s)")
    print(f"RESULT seeds={len(seeds)} loss_diff={mean['diff']:.4f} "
          f"loss_uniform={mean['uniform']:.4f} loss_teacher={mean['teacher']:.4f} "
          f"d_diff_vs_uniform={d_uniform['mean']:.4f} d_diff_vs_teacher={d_teacher['mean']:.4f} "
          f"score_vs_bare={rpc_tok_s / bare_tok_s:.3f} "
          f"select_vs_bare={select_tok_s / bare_tok_s:.3f}")


if __name__ == "__main__":
    main()
