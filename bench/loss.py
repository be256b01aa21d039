"""Loss benchmark: what KD costs over cross-entropy, and how close sparse gradients are to FullKD.

A Llama-style student (~16M parameters, vocabulary 49,152, random init, fp32,
AdamW) trains on a batch of Python standard-library text (8 x 512 tokens;
2 x 256 with --quick). Teacher targets come from the real SmolLM2-135M teacher.

Steps, each measured in a fresh subprocess (same seed, same batch) so that one
variant's freed memory cannot hide another's peak:
- ce        full logits + torch cross_entropy: the student's ordinary step;
- ce_fused  the fused chunked path with alpha = 0 (its own cross-entropy floor);
- kd_naive  full logits + (1 - a) CE + a RS-12 forward KL, autograd through
            logsumexp and a gather (never a dense target);
- kd_fused  last hidden state + the same loss through `fused_distill_loss`;
- fullkd    full logits + dense KL against dense teacher logits held in memory.
a = 0.5. Time: best of all timed steps (each run: one warm-up step, then the
timed ones; full mode runs every variant twice, interleaved). Memory: the
largest peak over the runs, see `MEMORY_METHOD` below.

Angles: the gradient of all student parameters for the measured batch under
pure KD (alpha = 1, forward KL) with RS-12, top-k-12 (renormalised: vanilla
top-k KD) and head_tail(4 + 8) targets, against the FullKD gradient (RS paper
Table 3), for the student at init (the RESULT line) and, unless
--warm-steps 0, again after that many FullKD steps on the following text
(the paper measured a FullKD-trained 300M student, where s is close to p and
top-k's bias dominates s - p; this CPU run can only move part of the way).

    python bench/loss.py [--quick] [--device cpu|cuda] [--warm-steps N]

Last line: RESULT kd_vs_ce_step=.. kd_vs_ce_mem=.. fused_vs_naive_mem=.. angle_rs12_deg=..
angle_topk12_deg=.. angle_headtail_deg=..  (kd = kd_fused; *_mem from peak_bytes)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results

from logitcast.ops import SparseTargets, TargetSpec, row_positions, sparsify
from logitcast.ops.fused import DEFAULT_CHUNK, fused_distill_loss
from logitcast.ops.losses import KDConfig, distill_loss, full_kd_loss

VOCAB = 49152
STUDENT = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 4}
ALPHA = 0.5
SPECS = {
    "rs12": TargetSpec(method="sample", unique=12.0),
    "topk12": TargetSpec(method="topk", k=12),
    "head_tail": TargetSpec(method="head_tail", k_head=4, unique=8.0),
}
VARIANTS = {
    "ce": "full logits + torch cross_entropy (the student's ordinary step)",
    "ce_fused": "fused chunked cross-entropy (alpha = 0): the fused path without KD",
    "kd_naive": "full logits + distill_loss: (1-a) CE + a RS-12 KL via autograd",
    "kd_fused": "last hidden state + fused_distill_loss: (1-a) CE + a RS-12 KL, chunked",
    "fullkd": "full logits + full_kd_loss against dense fp32 teacher logits",
}
MEMORY_METHOD = (
    "CPU: each variant runs in a fresh subprocess; after imports its RSS is the baseline; "
    "after one warm-up step the kernel's RSS high-water mark is reset (/proc/self/clear_refs "
    "= 5) and read back (VmHWM) after the timed steps. peak_bytes = VmHWM - baseline: "
    "parameters, grads, AdamW state, batch, targets (teacher logits for fullkd), activations, "
    "logits and loss buffers at the step's peak, like torch.cuda.max_memory_allocated. "
    "step_extra_bytes = VmHWM - RSS just before the timed steps (transients only). "
    "CUDA: max_memory_allocated after reset_peak_memory_stats, and the same minus "
    "memory_allocated before the steps."
)

NOTES = (
    "Times are best-of-N wall clock on whatever else the machine runs (see load_average). "
    "On CPU the ordinary CE step pays for materialising several [N, V] fp32 tensors (page "
    "faults included); the fused path reuses one [chunk, V] buffer, so KD through it can "
    "be cheaper than CE. Full mode keeps the 8 x 512 batch; the FullKD warm-up before the "
    "second angle measurement is limited (default 50 steps of 2 x 256 tokens) to keep the "
    "run near 10 minutes on 2 CPU cores."
)


# ---------------------------------------------------------------------------- teacher data

def corpus_tokens(tok, n: int) -> torch.Tensor:
    """int64 [>= n] token ids of standard-library documents joined with EOS."""
    from logitcast.data.corpus import stdlib_documents

    ids: list[int] = []
    for doc in stdlib_documents(max_chars=n * 8):
        ids.extend(tok(doc)["input_ids"] + [tok.eos_token_id])
        if len(ids) >= n:
            break
    return torch.tensor(ids)


def teacher_logits(teacher, inputs: torch.Tensor, device: str) -> torch.Tensor:
    """float32 [B*T, V] teacher logits on the CPU, computed 256 positions at a time."""
    with torch.inference_mode():
        hidden = teacher.model(inputs.to(device)).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        return torch.cat([teacher.lm_head(hidden[i:i + 256]).float().cpu()
                          for i in range(0, len(hidden), 256)])


def save_batch(teacher, tokens: torch.Tensor, rows: int, seq: int, device: str,
               out: Path) -> dict:
    """The measured batch: tokens, labels, sparse targets, dense teacher logits under `out`."""
    inputs = tokens[: rows * seq].view(rows, seq)
    labels = tokens[1: rows * seq + 1].clone()
    logits = teacher_logits(teacher, inputs, device)
    keys = torch.tensor([hash_row(r) for r in inputs])
    flat_keys, pos = row_positions(keys, seq)
    torch.save({"inputs": inputs, "labels": labels}, out / "batch.pt")
    torch.save(logits, out / "teacher_logits.pt")
    stats = {}
    for name, spec in SPECS.items():
        t = sparsify(logits, spec, row_keys=flat_keys, positions=pos, labels=labels)
        torch.save(targets_dict(t), out / f"{name}.pt")
        stats[name] = {"spec": spec.to_dict(),
                       "entries_per_pos": float(t.num_entries.float().mean()),
                       "mean_tail_mass": float(t.tail_mass.mean())}
    return stats


def hash_row(row: torch.Tensor) -> int:
    digest = hashlib.blake2b(row.to(torch.int32).numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def targets_dict(t: SparseTargets) -> dict:
    return {f.name: getattr(t, f.name) for f in dataclasses.fields(t)}


def load_targets(path: Path, device: str) -> SparseTargets:
    return SparseTargets(**torch.load(path, weights_only=True)).to(device)


def build_student(device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=1024,
                      **STUDENT)
    return LlamaForCausalLM(cfg).to(device)


# ---------------------------------------------------------------------------- one variant (child)

def _proc_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def run_variant(variant: str, data: Path, device: str, repeat: int, chunk: int) -> dict:
    cuda = device == "cuda"
    base = torch.cuda.memory_allocated() if cuda else _proc_kib("VmRSS") * 1024
    batch = torch.load(data / "batch.pt", weights_only=True)
    inputs, labels = batch["inputs"].to(device), batch["labels"].to(device)
    targets = load_targets(data / "rs12.pt", device) if variant.startswith("kd") else None
    teacher = (torch.load(data / "teacher_logits.pt", weights_only=True).to(device)
               if variant == "fullkd" else None)
    model = build_student(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = KDConfig(loss="kl")

    def step() -> float:
        if variant in ("ce_fused", "kd_fused"):
            hidden = model.model(input_ids=inputs, use_cache=False).last_hidden_state
            loss, _ = fused_distill_loss(hidden.reshape(-1, hidden.shape[-1]),
                                         model.lm_head.weight, targets, labels,
                                         alpha=0.0 if targets is None else ALPHA, config=cfg,
                                         chunk_size=chunk)
        else:
            logits = model(input_ids=inputs, use_cache=False).logits.reshape(-1, VOCAB)
            if variant == "ce":
                loss = F.cross_entropy(logits, labels)
            elif variant == "kd_naive":
                loss, _ = distill_loss(logits, targets, labels, alpha=ALPHA, config=cfg)
            else:
                loss, _ = full_kd_loss(logits, teacher, labels, alpha=ALPHA)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    first_loss = step()  # warm-up: allocates AdamW state
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_kib("VmRSS") * 1024
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else _proc_kib("VmHWM") * 1024
    return {"step_s": min(times), "step_s_all": times, "peak_bytes": peak - base,
            "step_extra_bytes": peak - before, "first_loss": first_loss}


# ---------------------------------------------------------------------------- angles

def gradient_angles(model: torch.nn.Module, data: Path, device: str, chunk: int) -> dict:
    """Angle and norm ratio of sparse-KD parameter gradients against FullKD (alpha = 1, KL)."""
    batch = torch.load(data / "batch.pt", weights_only=True)
    inputs, labels = batch["inputs"].to(device), batch["labels"].to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    def grad_of(loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, params)
        return torch.cat([g.reshape(-1) for g in grads]).double()

    teacher = torch.load(data / "teacher_logits.pt", weights_only=True).to(device)
    logits = model(input_ids=inputs, use_cache=False).logits.reshape(-1, VOCAB)
    full = grad_of(full_kd_loss(logits, teacher, labels, alpha=1.0)[0])
    del logits, teacher
    out = {}
    for name in SPECS:
        targets = load_targets(data / f"{name}.pt", device)
        hidden = model.model(input_ids=inputs, use_cache=False).last_hidden_state
        cfg = KDConfig(loss="kl", normalize=name == "topk12")
        loss, _ = fused_distill_loss(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight,
                                     targets, labels, alpha=1.0, config=cfg, chunk_size=chunk)
        g = grad_of(loss)
        cos = float(torch.dot(g, full) / (g.norm() * full.norm()))
        out[name] = {"angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, cos)))),
                     "norm_ratio": float(g.norm() / full.norm()),
                     "loss_config": dataclasses.asdict(cfg)}
        print(f"  {name:<10} angle to FullKD {out[name]['angle_deg']:6.2f} deg, "
              f"norm ratio {out[name]['norm_ratio']:.3f}", flush=True)
    return out


def fullkd_warmup(model: torch.nn.Module, teacher, tokens: torch.Tensor, steps: int,
                  device: str) -> list[float]:
    """Train the student `steps` FullKD steps (alpha = 1, AdamW lr 3e-3) on 2 x 256-token
    batches that follow the measured batch in `tokens`; returns the KD losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows, seq, losses = 2, 256, []
    for step in range(steps):
        start = (step * rows * seq) % (len(tokens) - rows * seq - 1)
        inputs = tokens[start: start + rows * seq].view(rows, seq)
        labels = tokens[start + 1: start + rows * seq + 1].to(device)
        logits = model(input_ids=inputs.to(device), use_cache=False).logits.reshape(-1, VOCAB)
        loss, parts = full_kd_loss(logits, teacher_logits(teacher, inputs, device).to(device),
                                   labels, alpha=1.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(parts["kd"]))
    return losses


# ---------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 x 256 tokens, <= 60 s on 2 cores")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="fused positions per chunk")
    ap.add_argument("--repeat", type=int, default=None, help="timed steps per variant run")
    ap.add_argument("--rounds", type=int, default=None, help="subprocess runs per variant")
    ap.add_argument("--warm-steps", type=int, default=None,
                    help="FullKD steps before a second angle measurement (0 skips it)")
    ap.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    repeat = args.repeat or 2
    rounds = args.rounds or (1 if args.quick else 2)
    warm_steps = args.warm_steps if args.warm_steps is not None else (0 if args.quick else 50)
    if args.child:
        print("CHILD " + json.dumps(run_variant(args.child, args.data, args.device, repeat,
                                                args.chunk)))
        return

    from logitcast.server.embedded import load_embedded_teacher

    t0 = time.perf_counter()
    rows, seq = (2, 256) if args.quick else (8, 512)
    load = [os.getloadavg()[0]]
    teacher, tok = load_embedded_teacher(dtype=torch.bfloat16)
    teacher.to(args.device)
    tokens = corpus_tokens(tok, rows * seq + 1 + warm_steps * 512 + 1)
    with tempfile.TemporaryDirectory(prefix="logitcast-bench-loss-") as tmp:
        data = Path(tmp)
        targets = save_batch(teacher, tokens, rows, seq, args.device, data)
        phases = {"teacher_and_targets": time.perf_counter() - t0}
        print(f"teacher targets for {rows} x {seq} tokens ready "
              f"({phases['teacher_and_targets']:.1f} s)", flush=True)
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for rnd in range(rounds):  # rounds interleave the variants against load bursts
            for variant in VARIANTS:
                cmd = [sys.executable, __file__, "--child", variant, "--data", str(data),
                       "--device", args.device, "--repeat", str(repeat),
                       "--chunk", str(args.chunk)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                line = next(x for x in proc.stdout.splitlines() if x.startswith("CHILD "))
                r = json.loads(line[6:])
                runs[variant].append(r)
                print(f"  round {rnd} {variant:<9} step {r['step_s']:7.3f} s   peak "
                      f"{r['peak_bytes'] / 2**20:8.1f} MiB   step extra "
                      f"{r['step_extra_bytes'] / 2**20:8.1f} MiB   loss {r['first_loss']:.4f}",
                      flush=True)
        steps = {v: {"what": VARIANTS[v],
                     "step_s": min(r["step_s"] for r in rs),
                     "peak_bytes": max(r["peak_bytes"] for r in rs),
                     "step_extra_bytes": max(r["step_extra_bytes"] for r in rs),
                     "runs": rs} for v, rs in runs.items()}
        phases["steps"] = time.perf_counter() - t0 - phases["teacher_and_targets"]
        student = build_student(args.device)
        print("gradient angles, student at init:")
        angles = gradient_angles(student, data, args.device, args.chunk)
        warm = None
        if warm_steps:
            t1 = time.perf_counter()
            kd = fullkd_warmup(student, teacher, tokens[rows * seq:], warm_steps, args.device)
            phases["fullkd_warmup"] = time.perf_counter() - t1
            print(f"gradient angles after {warm_steps} FullKD steps (KD loss {kd[0]:.2f} -> "
                  f"{sum(kd[-10:]) / len(kd[-10:]):.2f}):")
            warm = {"steps": warm_steps, "batch": [2, 256], "lr": 3e-3, "kd_loss": kd,
                    "angles": gradient_angles(student, data, args.device, args.chunk)}
    load.append(os.getloadavg()[0])

    ce, naive, fused = steps["ce"], steps["kd_naive"], steps["kd_fused"]
    result = {
        "kd_vs_ce_step": round(fused["step_s"] / ce["step_s"], 3),
        "kd_vs_ce_mem": round(fused["peak_bytes"] / ce["peak_bytes"], 3),
        "fused_vs_naive_mem": round(fused["peak_bytes"] / naive["peak_bytes"], 3),
        "angle_rs12_deg": round(angles["rs12"]["angle_deg"], 2),
        "angle_topk12_deg": round(angles["topk12"]["angle_deg"], 2),
        "angle_headtail_deg": round(angles["head_tail"]["angle_deg"], 2),
    }
    extra = {
        "kd_vs_ce_step_extra_mem": fused["step_extra_bytes"] / ce["step_extra_bytes"],
        "fused_vs_naive_step_extra_mem": fused["step_extra_bytes"] / naive["step_extra_bytes"],
        "kd_fused_vs_ce_fused_step": fused["step_s"] / steps["ce_fused"]["step_s"],
        "kd_naive_vs_ce_step": naive["step_s"] / ce["step_s"],
        "fullkd_vs_ce_step": steps["fullkd"]["step_s"] / ce["step_s"],
    }
    suffix = ("-quick" if args.quick else "") + ("-gpu" if args.device == "cuda" else "")
    path = write_results("loss", {
        "quick": args.quick, "device": args.device, "batch": [rows, seq], "alpha": ALPHA,
        "student": {"vocab_size": VOCAB, **STUDENT, "tied_embeddings": True, "dtype": "float32",
                    "optimizer": "AdamW", "init": "random, torch.manual_seed(0)"},
        "fused_chunk": args.chunk, "timed_steps_per_run": repeat, "rounds": rounds, "memory_method": MEMORY_METHOD,
        "notes": NOTES,
        "load_average_1min_start_end": load, "targets": targets, "steps": steps,
        "angles_at_init": angles, "angles_after_fullkd_warmup": warm, "ratios": extra,
        "result": result, "phase_s": phases, "wall_s": time.perf_counter() - t0,
    }, suffix=suffix)
    print(f"wrote {path}")
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
