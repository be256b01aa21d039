"""Distillation losses on full student logits: LM loss, sparse KD, their mix, FullKD.

    total = (1 - alpha) * L_lm + alpha * L_kd        (PD eq. 1)

L_lm is the hard-label cross-entropy, L_kd one of `KD_LOSSES` (see `kd_terms`)
against `SparseTargets`; both are means over the positions whose label is not
`ignore_index`. A sparse target is never expanded to [N, V]: the KD term reads
the student's logsumexp and a gather at the K target ids, the same work as the
cross-entropy. `fused.py` computes the same losses from the last hidden state
without full logits; `full_kd_loss` is the dense reference.

Temperature. The teacher's temperature belongs to the targets: a static one is
applied before sparsifying (`TargetSpec.temperature`, PD eq. 4), the only place
it can be applied to sampled targets. `KDConfig.temperature` divides the
*student* logits inside the KD term (Hinton-style when it equals the teacher's;
PD keeps it at 1; no tau^2 factor). AdaKD_H (PD eq. 5) sets a per-position
teacher temperature from the teacher entropy: `adakd_temperature` computes it and
`retemper` applies it to targets made of exact probabilities (topk, top_p_k,
full), where softmax(log w / tau) over the support is exactly PD's
softmax(Truncate(z) / tau). Sampled weights are estimates, not probabilities,
so they cannot be re-tempered after the fact.

This module knows nothing about chunking, hidden states or schedules.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from logitcast.ops.kd_terms import HEAD_LOSSES, KD_LOSSES, LossTargets
from logitcast.ops.targets import SparseTargets

IGNORE_INDEX = -100
#: Slack on "weights of a position sum to <= 1" (fp32 sums of quantised weights).
WEIGHT_SUM_TOL = 1e-3
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass(frozen=True, kw_only=True)
class KDConfig:
    """What the KD term computes; alpha (the mix) is passed per step."""

    loss: str = "kl"
    """One of `KD_LOSSES`: nll, kl, mse, ghost, naive_fix, tad."""
    temperature: float = 1.0
    """Static temperature dividing the student logits inside the KD term (not the LM term)."""
    normalize: bool = False
    """nll / kl / mse: renormalise the weights over the support to sum to 1 (vanilla top-k KD)."""
    beta: float = 2.0
    """tad: tail weight beta of TAD eq. 3 (the paper's best is 2)."""
    seq_len: int | None = None
    """tad: positions per sequence for the mean tail mass; None averages over all N."""
    ignore_index: int = IGNORE_INDEX
    """Label value of positions that count in neither term."""

    def __post_init__(self) -> None:
        if self.loss not in KD_LOSSES:
            hint = "; dense FullKD is full_kd_loss()" if self.loss == "full_kd" else ""
            raise ValueError(f"loss must be one of {sorted(KD_LOSSES)}, got {self.loss!r}{hint}")
        _check_positive("temperature", self.temperature)
        if self.normalize and self.loss not in ("nll", "kl", "mse"):
            raise ValueError(f"normalize applies to nll, kl and mse, not loss={self.loss!r}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be finite and >= 0, got {self.beta!r}")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len < 1):
            raise ValueError(f"seq_len must be None or an int >= 1, got {self.seq_len!r}")
        if not isinstance(self.ignore_index, int) or self.ignore_index >= 0:
            raise ValueError(f"ignore_index must be a negative int, got {self.ignore_index!r}")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def check_alpha(alpha: float) -> float:
    """alpha as a float, or ValueError unless it is a number in [0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def check_labels(labels: torch.Tensor, n: int, vocab: int, device: torch.device,
                 ignore_index: int) -> torch.Tensor:
    """bool [N] mask of counted positions; ValueError on bad shape, dtype, device or values."""
    if not isinstance(labels, torch.Tensor) or labels.dtype not in _INT_DTYPES:
        raise ValueError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', labels)!r}")
    if tuple(labels.shape) != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device}, the student on {device}")
    counted = labels != ignore_index
    bad = counted & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"label {int(labels[i])} at position {i} is outside [0, {vocab}) "
                         f"and not ignore_index={ignore_index}")
    return counted


# ---------------------------------------------------------------------------- targets

def loss_targets(targets: SparseTargets, labels: torch.Tensor, counted: torch.Tensor,
                 config: KDConfig, vocab: int) -> LossTargets:
    """Validate `targets` against a student with `vocab` logits and lay them out for the terms.

    labels: int [N] true next tokens; counted: bool [N] positions in the mean.
    """
    n, device = counted.shape[0], counted.device
    if not isinstance(targets, SparseTargets):
        raise ValueError(f"targets must be SparseTargets, got {type(targets).__name__}")
    if len(targets) != n:
        raise ValueError(f"targets have {len(targets)} positions, the student {n}")
    if targets.device != device:
        raise ValueError(f"targets are on {targets.device}, the student on {device}")
    if targets.vocab_size > vocab:
        raise ValueError(f"targets.vocab_size {targets.vocab_size} exceeds the student's "
                         f"{vocab} logits")
    if targets.ids.dtype not in _INT_DTYPES:
        raise ValueError(f"targets.ids must be an integer tensor, got {targets.ids.dtype}")
    if not targets.weights.dtype.is_floating_point:
        raise ValueError(f"targets.weights must be a float tensor, got {targets.weights.dtype}")
    k = targets.width
    col = torch.arange(k, device=device)
    valid = col[None, :] < targets.num_entries[:, None]
    head = valid & (col[None, :] < targets.num_head[:, None])
    w = torch.where(valid, targets.weights.float(), 0.0)
    ids = torch.where(valid, targets.ids.long(), 0)
    sums = w.double().sum(dim=1)
    problems = {
        "num_entries outside [0, K]": (targets.num_entries < 0) | (targets.num_entries > k),
        "num_head outside [0, num_entries]":
            (targets.num_head < 0) | (targets.num_head > targets.num_entries),
        f"an id outside [0, {targets.vocab_size})":
            (valid & ((ids < 0) | (ids >= targets.vocab_size))).any(dim=1),
        "a weight < 0 or not finite": (valid & ~(targets.weights >= 0)).any(dim=1)
            | ~torch.isfinite(sums),
        f"weights summing to more than 1 + {WEIGHT_SUM_TOL}": sums > 1.0 + WEIGHT_SUM_TOL,
        "tail_mass outside [0, 1]": ~((targets.tail_mass >= 0) & (targets.tail_mass <= 1)),
    }
    if config.loss in HEAD_LOSSES:
        problems[f"no exact head entries ({config.loss} needs topk, top_p_k, head_tail or full "
                 "targets)"] = counted & (targets.num_head == 0)
    if config.loss == "tad":
        problems["tail mass but no tail entries (tad estimates the tail from head_tail "
                 "samples)"] = counted & (targets.tail_mass > WEIGHT_SUM_TOL) \
            & (targets.num_entries <= targets.num_head)
    flags = torch.stack([bad.any() for bad in problems.values()]).tolist()
    for (what, bad), hit in zip(problems.items(), flags):
        if hit:
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"targets: position {i} has {what} (weights "
                             f"{targets.weights[i, :8].tolist()}, num_entries "
                             f"{int(targets.num_entries[i])}, num_head {int(targets.num_head[i])})")
    if config.normalize:
        w = w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    hit = valid & (ids == labels[:, None].long()) & counted[:, None]
    hit = hit & (hit.cumsum(dim=1) == 1)
    tail_mass = targets.tail_mass.float()
    if config.loss == "tad":
        scale = tad_tail_scale(tail_mass, counted, beta=config.beta, seq_len=config.seq_len)
    else:
        scale = torch.zeros_like(tail_mass)
    return LossTargets(ids=ids, weights=w, valid=valid, head=head, tail_mass=tail_mass,
                       label_hit=hit, tail_scale=scale)


def tad_tail_scale(tail_mass: torch.Tensor, counted: torch.Tensor, *, beta: float,
                   seq_len: int | None) -> torch.Tensor:
    """float32 [N] beta / (mean tail mass of the position's sequence), TAD eq. 3.

    Sequences are consecutive runs of `seq_len` positions (None: all N); the mean
    is over counted positions; a sequence with zero mean tail mass gets scale 0.
    """
    n = tail_mass.shape[0]
    length = seq_len or max(n, 1)
    if n % length:
        raise ValueError(f"seq_len={seq_len} does not divide the {n} positions")
    mass = torch.where(counted, tail_mass.float(), 0.0).view(-1, length)
    mean = mass.sum(dim=1) / counted.view(-1, length).sum(dim=1).clamp_min(1)
    scale = torch.where(mean > 0, beta / mean.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return scale.repeat_interleave(length)


# ---------------------------------------------------------------------------- losses

def _masked_mean(per_pos: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    return torch.where(counted, per_pos, 0.0).sum() / counted.sum().clamp_min(1)


def _float_matrix(name: str, x: torch.Tensor) -> torch.Tensor:
    """x as a float [N, V] tensor of at least fp32 precision, or ValueError naming it."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a float [N, V] tensor, got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    return x.to(torch.promote_types(x.dtype, torch.float32))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, *,
            ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Hard-label cross-entropy: mean over counted positions of lse(z) - z_label.

    logits: float [N, V]; labels: int [N] (ignore_index marks positions to skip).
    """
    z = _float_matrix("logits", logits)
    counted = check_labels(labels, z.shape[0], z.shape[1], z.device, ignore_index)
    z_label = z.gather(1, torch.where(counted, labels, 0).long()[:, None])[:, 0]
    return _masked_mean(torch.logsumexp(z, dim=1) - z_label, counted)


def distill_loss(logits: torch.Tensor, targets: SparseTargets | None, labels: torch.Tensor, *,
                 alpha: float, config: KDConfig | None = None,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1 - alpha) * LM loss + alpha * sparse KD loss from full student logits.

    logits: float [N, V] student logits (any float dtype; computed in >= fp32).
    targets: N positions of `SparseTargets` on the same device (None only when alpha = 0).
    labels: int [N] true next tokens, `config.ignore_index` where a position does not count.
    Returns (total scalar, {"lm": ..., "kd": ...} detached scalars).
    """
    config = config or KDConfig()
    alpha = check_alpha(alpha)
    z = _float_matrix("logits", logits)
    n, vocab = z.shape
    counted = check_labels(labels, n, vocab, z.device, config.ignore_index)
    safe_labels = torch.where(counted, labels, 0).long()[:, None]
    lse = torch.logsumexp(z, dim=1)
    z_label = z.gather(1, safe_labels)[:, 0]
    lm = _masked_mean(lse - z_label, counted)
    if targets is None:
        if alpha != 0.0:
            raise ValueError(f"targets are required when alpha={alpha} > 0")
        return lm, {"lm": lm.detach()}
    t = loss_targets(targets, labels, counted, config, vocab)
    if config.temperature != 1.0:
        z = z / config.temperature
        lse = torch.logsumexp(z, dim=1)
        z_label = z.gather(1, safe_labels)[:, 0]
    per_pos = KD_LOSSES[config.loss](z.gather(1, t.ids), lse, z_label, t)
    kd = _masked_mean(per_pos, counted)
    return (1.0 - alpha) * lm + alpha * kd, {"lm": lm.detach(), "kd": kd.detach()}


def full_kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                 alpha: float, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FullKD reference: (1 - alpha) * LM loss + alpha * KL(softmax(teacher) || softmax(z / tau)).

    logits, teacher_logits: float [N, V] (teacher at the temperature it should be used at);
    dense, [N, V]-sized intermediates. Returns (total, {"lm": ..., "kd": ...}).
    """
    alpha = check_alpha(alpha)
    _check_positive("temperature", temperature)
    z = _float_matrix("logits", logits)
    t = _float_matrix("teacher_logits", teacher_logits)
    if t.shape != z.shape or t.device != z.device:
        raise ValueError(f"teacher_logits {tuple(t.shape)} on {t.device} do not match the "
                         f"student logits {tuple(z.shape)} on {z.device}")
    counted = check_labels(labels, z.shape[0], z.shape[1], z.device, ignore_index)
    z_label = z.gather(1, torch.where(counted, labels, 0).long()[:, None])[:, 0]
    lm = _masked_mean(torch.logsumexp(z, dim=1) - z_label, counted)
    log_p = torch.log_softmax(t.detach(), dim=1)
    log_s = torch.log_softmax(z / temperature, dim=1)
    per_pos = (log_p.exp() * (log_p - log_s)).nan_to_num(0.0).sum(dim=1)
    kd = _masked_mean(per_pos, counted)
    return (1.0 - alpha) * lm + alpha * kd, {"lm": lm.detach(), "kd": kd.detach()}


# ---------------------------------------------------------------------------- temperature

def adakd_temperature(entropy: torch.Tensor, *, tau_max: float = 2.0, tau_min: float = 0.1,
                      h_max: float = 4.8) -> torch.Tensor:
    """float32 [N] AdaKD_H temperatures (PD eq. 5): tau_max - (tau_max - tau_min) * H / h_max.

    entropy: float [N] teacher entropy in nats (`SparseTargets.entropy`); H / h_max is
    clamped to [0, 1], so tau stays in [tau_min, tau_max]. Defaults are PD's.
    """
    _check_positive("tau_min", tau_min)
    _check_positive("h_max", h_max)
    if not (isinstance(tau_max, (int, float)) and math.isfinite(tau_max) and tau_max >= tau_min):
        raise ValueError(f"tau_max must be finite and >= tau_min={tau_min}, got {tau_max!r}")
    if not entropy.dtype.is_floating_point or entropy.dim() != 1:
        raise ValueError(f"entropy must be a float [N] tensor, got {entropy.dtype} "
                         f"{tuple(entropy.shape)}")
    frac = (entropy.float() / h_max).clamp(0.0, 1.0)
    return tau_max - (tau_max - tau_min) * frac


def retemper(targets: SparseTargets, temperature: torch.Tensor | float) -> SparseTargets:
    """Targets re-tempered per position: w <- softmax(log w / tau) over the support.

    targets: exact probabilities only (topk, top_p_k, full: num_head == num_entries);
    temperature: float or float [N] (e.g. `adakd_temperature(targets.entropy)`).
    The result sums to 1 over the support (PD eq. 4 on truncated logits): tail_mass 0.
    """
    n = len(targets)
    tau = torch.as_tensor(temperature, dtype=torch.float32, device=targets.device)
    if tau.dim() == 0:
        tau = tau.expand(n)
    if tuple(tau.shape) != (n,):
        raise ValueError(f"temperature must be a float or shape ({n},), got {tuple(tau.shape)}")
    if not bool(((tau > 0) & torch.isfinite(tau)).all()):
        raise ValueError(f"temperatures must be finite and > 0, got min {float(tau.min())}")
    if bool((targets.num_head < targets.num_entries).any()):
        raise ValueError("retemper needs exact probabilities (topk, top_p_k, full targets); "
                         "sampled weights are estimates: set TargetSpec.temperature instead")
    valid = torch.arange(targets.width, device=targets.device)[None, :] \
        < targets.num_entries[:, None]
    logits = torch.where(valid & (targets.weights > 0), targets.weights.float().log(),
                         float("-inf")) / tau[:, None]
    w = torch.softmax(logits, dim=1).nan_to_num(0.0)  # rows without mass stay 0
    return dataclasses.replace(targets, weights=w, tail_mass=torch.zeros_like(targets.tail_mass))
