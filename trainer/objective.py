"""The student's distillation objective, for our trainer and for anyone's own loop.

    total = (1 - alpha) * CE(labels) + alpha * KD(targets)

`student_loss(model, ...)` runs an HF causal LM's decoder to its last hidden
state and applies the fused chunked loss with its LM head (or, with
fused=False, the plain loss on full logits): the same numbers either way.
`DistillObjective` wraps a student as one `nn.Module` whose forward returns
the loss, so DeepSpeed (ZeRO-3 included: the LM head is registered as an
external parameter of the wrapper) drives it like any model. `evaluate_batch`
measures a batch without gradients: LM loss, KL to the teacher target, top-1
agreement and the calibration histogram.

Labels are already the next tokens (`PackedBatch.labels[t]` follows
`input_ids[t]`), so nothing is shifted here. This module knows nothing about
where targets come from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from logitcast.data.packing import IGNORE
from logitcast.ops import KDConfig, SparseTargets, distill_loss, fused_distill_loss

if TYPE_CHECKING:
    from logitcast.trainer.record import TargetRecorder

#: Equal-width confidence bins of the expected calibration error.
ECE_BINS = 15


def document_attention(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool [B, 1, T, T] causal mask within each document, int64 [B, T] position ids)."""
    b, t = document_ids.shape
    same = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    idx = torch.arange(t, device=document_ids.device).expand(b, t)
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return (same & causal)[:, None], idx - first


def last_hidden(model: torch.nn.Module, input_ids: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """float [B*T, d]: the decoder's final-norm output of an HF causal LM."""
    kwargs = {}
    if document_ids is not None:
        kwargs["attention_mask"], kwargs["position_ids"] = document_attention(document_ids)
    out = model.get_decoder()(input_ids=input_ids, use_cache=False, **kwargs)
    return out.last_hidden_state.flatten(0, 1)


def student_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                 targets: SparseTargets | None, *, alpha: float, config: KDConfig | None = None,
                 document_ids: torch.Tensor | None = None, fused: bool = True,
                 chunk_size: int = 512, recorder: TargetRecorder | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total with grad, {"lm", "kd"} detached) for one batch.

    input_ids, labels: int64 [B, T] (labels are the next tokens, IGNORE where nothing
    counts); targets: `SparseTargets` over the B*T positions in row-major order, on the
    model's device (None only when alpha = 0). recorder: a `trainer.record.TargetRecorder`
    that records this batch's sparse targets from the same logits (fused: from each
    chunk the loss forms; plain: its own chunked pass over the hidden states).
    """
    config = config or KDConfig(ignore_index=IGNORE)
    hidden = last_hidden(model, input_ids, document_ids)
    weight = model.get_output_embeddings().weight
    flat = labels.reshape(-1)
    if fused:
        sink = (None if recorder is None
                else recorder.batch(input_ids, hidden.device, document_ids))
        out = fused_distill_loss(hidden, weight.to(hidden.dtype), targets, flat, alpha=alpha,
                                 config=config, chunk_size=chunk_size, on_logits=sink)
        if sink is not None:
            sink.done()
        return out
    if recorder is not None:
        recorder(hidden.detach(), weight.detach(), input_ids, document_ids)
    return distill_loss(hidden @ weight.to(hidden.dtype).T, targets, flat, alpha=alpha,
                        config=config)


class DistillObjective(torch.nn.Module):
    """A student whose forward is its training loss (what DeepSpeed's engine wraps)."""

    def __init__(self, student: torch.nn.Module, config: KDConfig, *, fused: bool = True,
                 chunk_size: int = 512, zero3: bool = False) -> None:
        super().__init__()
        self.student, self.config, self.fused, self.chunk_size = student, config, fused, chunk_size
        self.recorder: TargetRecorder | None = None  # recording mode
        if zero3:  # the LM head weight is read directly, not through lm_head.forward
            import deepspeed

            deepspeed.zero.register_external_parameter(
                self, student.get_output_embeddings().weight)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                targets: SparseTargets | None, alpha: float,
                document_ids: torch.Tensor | None = None):
        return student_loss(self.student, input_ids, labels, targets, alpha=alpha,
                            config=self.config, document_ids=document_ids, fused=self.fused,
                            chunk_size=self.chunk_size, recorder=self.recorder)


def empty_sums() -> dict[str, torch.Tensor]:
    """Zeroed float64 accumulators of `evaluate_batch` (all-reducible, summed by `summarize`)."""
    out = {k: torch.zeros((), dtype=torch.float64) for k in
           ("n", "nll", "correct", "conf", "n_teacher", "kl", "agree", "n_teacher_lp",
            "teacher_nll")}
    for k in ("bin_n", "bin_conf", "bin_correct"):
        out[k] = torch.zeros(ECE_BINS, dtype=torch.float64)
    return out


def logit_stats(z: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-1 log-prob, top-1 id, label log-prob, logsumexp), each [n], from fp32 logits
    z [n, V] at labels [n] (valid ids), without forming the [n, V] log-probs: one max pass
    and one in-place exp pass. z is consumed: it is left holding exp(z - max z)."""
    top, top1 = z.max(dim=1)
    z_label = z.gather(1, labels[:, None])[:, 0]
    log_sum = z.sub_(top[:, None]).exp_().sum(dim=1).log()
    return -log_sum, top1, (z_label - top) - log_sum, top + log_sum


def add_position_sums(out: dict[str, torch.Tensor], top_logp: torch.Tensor,
                      top1: torch.Tensor, label_logp: torch.Tensor,
                      labels: torch.Tensor) -> None:
    """Add the student-only sums of counted positions into `out` from their top-1
    log-prob, top-1 id and label log-prob (each [n]). Shared by `evaluate_batch` and the
    quality benchmark (which takes them from `logit_stats`)."""
    conf = top_logp.exp().double()
    right = top1 == labels
    out["n"] += labels.numel()
    out["nll"] -= label_logp.sum().double()
    out["correct"] += right.sum()
    out["conf"] += conf.sum()
    b = torch.clamp((conf * ECE_BINS).long(), max=ECE_BINS - 1)
    out["bin_n"] += torch.bincount(b, minlength=ECE_BINS).double()
    out["bin_conf"] += torch.bincount(b, weights=conf, minlength=ECE_BINS)
    out["bin_correct"] += torch.bincount(b, weights=right.double(), minlength=ECE_BINS)


@torch.no_grad()
def evaluate_batch(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   targets: SparseTargets | None, *, document_ids: torch.Tensor | None = None,
                   chunk_size: int = 512) -> dict[str, torch.Tensor]:
    """Sums over the counted positions of one batch (float64 tensors, all-reducible):

    n, nll (CE on the true tokens), correct (student top-1 == label), conf (its top-1
    probability), and per ECE bin bin_n / bin_conf / bin_correct; with targets also n_teacher, kl (KL(teacher || student)
    estimated without bias as -H_teacher - sum_k w_k log p_s(k): it needs targets whose
    weights estimate the whole distribution at temperature 1 and the entropy extra, else
    NaN), agree (student top-1 == teacher top-1, exact when targets have a head entry),
    and n_teacher_lp / teacher_nll (the teacher's CE where targets carry a finite logprob).
    """
    hidden = last_hidden(model, input_ids, document_ids)
    head = model.get_output_embeddings()  # called as a module: ZeRO-3 gathers its weight
    flat = labels.reshape(-1)
    out = empty_sums()
    for s in range(0, hidden.shape[0], chunk_size):
        lab = flat[s:s + chunk_size]
        keep = lab != IGNORE
        if not keep.any():
            continue
        z = head(hidden[s:s + chunk_size][keep]).float()
        if targets is not None:
            t = targets[s:s + chunk_size]
            idx = keep.nonzero().squeeze(1)
            ids, w = t.ids[idx].long(), t.weights[idx].float()
            z_ids = z.gather(1, ids.clamp(min=0))  # before logit_stats consumes z
        top_logp, top1, label_logp, lse = logit_stats(z, lab[keep])
        add_position_sums(out, top_logp, top1, label_logp, lab[keep])
        if targets is None:
            continue
        live = torch.arange(ids.shape[1], device=ids.device)[None] < t.num_entries[idx, None]
        cross = -(torch.where(live, w * (z_ids - lse[:, None]), 0.0)).sum(dim=1)
        has_h = torch.isfinite(t.entropy[idx]) if t.entropy is not None else None
        if has_h is not None and has_h.all():
            out["kl"] += (cross - t.entropy[idx].float()).sum().double()
        else:
            out["kl"] += torch.nan
        # The teacher's top-1: the first exact head entry, else the heaviest sampled one.
        exact_first = t.num_head[idx] > 0
        teacher_top1 = torch.where(
            exact_first, ids[:, 0], ids.gather(1, torch.where(live, w, -1.0).argmax(1, keepdim=True))[:, 0])
        out["n_teacher"] += idx.numel()
        out["agree"] += (top1 == teacher_top1).sum()
        if t.logprob is not None:  # the teacher's own CE on these positions: the floor
            lp = t.logprob[idx].double()
            known = torch.isfinite(lp)
            out["n_teacher_lp"] += known.sum()
            out["teacher_nll"] -= lp[known].sum()
    return out


def summarize(sums: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """lm_loss, accuracy, confidence, overconfidence (confidence - accuracy), ece,
    kl_to_teacher, top1_agreement and teacher_lm_loss (the teacher's own CE where its
    targets carry the label's log-prob) from `evaluate_batch`."""
    n = float(sums["n"])
    if n == 0:
        raise ValueError("no counted positions in the eval rows")
    bn = sums["bin_n"]
    ece = float((bn > 0).double() @ (sums["bin_conf"] - sums["bin_correct"]).abs()) / n
    nt = float(sums["n_teacher"])
    kl = float(sums["kl"]) / nt if nt else None
    n_lp = float(sums.get("n_teacher_lp", 0))
    acc, conf = float(sums["correct"]) / n, float(sums.get("conf", torch.nan)) / n
    return {"lm_loss": float(sums["nll"]) / n, "accuracy": acc, "confidence": conf,
            "overconfidence": conf - acc, "ece": ece,
            "kl_to_teacher": kl if kl is None or kl == kl else None,
            "top1_agreement": float(sums["agree"]) / nt if nt else None, "positions": int(n),
            "teacher_lm_loss": float(sums["teacher_nll"]) / n_lp if n_lp else None}
