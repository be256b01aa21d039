"""KD loss terms: per-position losses from a student's log-sum-exp and a gather at K ids.

Every sparse KD loss here is a function of three small student tensors and the
target. With z the student logits of one position (after the student
temperature, see `losses.py`):

- `z_ids`   [n, K]  z gathered at the target ids,
- `lse`     [n]     logsumexp of z over the whole vocabulary,
- `z_label` [n]     z at the true next token,

so log s_i = z_i - lse is known exactly at the K ids and at the label, and the
student mass of any subset of those ids is a small logsumexp. That is the work
of a cross-entropy: the unfused path gets the three tensors from full logits
with autograd, the fused path (`fused.py`) from one chunk of logits at a time
and turns d loss / d(z_ids, lse, z_label) back into a logit gradient itself.
Both call the same term functions.

Terms (`KD_LOSSES`); s student, w target weights, K the valid entries, H the
exact head entries (`num_head`), g the teacher mass outside H (`tail_mass`):

- `nll`        soft cross-entropy  -sum_K w log s            (PD's default)
- `kl`         forward KL          sum_K w log(w / s)         (same gradient as nll)
- `mse`        sum_K (s - w)^2 on the support                 (PD shows it is worse)
- `ghost`      KL over H plus one ghost class: teacher g, student 1 - sum_H s
               (Sparse Logit Sampling section 3.2, appendix A.5)
- `naive_fix`  KL against w with the residual 1 - sum_K w added to the true token
               (Sparse Logit Sampling section 3.3)
- `tad`        ghost KL over H + tail_scale * g * KL(tail_T / g || tail_S / (1 - sum_H s)),
               the tail read from the entries after H (TAD eq. 2-3); with `head_tail`
               targets the tail entries are unbiased samples, so the tail term's
               gradient is an unbiased estimate of TAD's

Values of the KL-type terms are those of the sparse target as written (for
sampled targets the gradient is unbiased, the value is a plug-in estimate).

This module knows nothing about chunking, position averaging, the LM-loss mix
or temperatures (`losses.py`, `fused.py`); it only sees prepared targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Floor added to the student's ghost mass 1 - sum_H s before its log. Differences
#: of fp32 log-sum-exps resolve masses down to about this size; below it the
#: ghost gradient would be rounding noise amplified by 1 / (1 - sum_H s).
GHOST_EPS = 1e-6


@dataclass(frozen=True)
class LossTargets:
    """Target-side tensors of N positions, validated and laid out for the terms."""

    ids: torch.Tensor
    """int64 [N, K] token ids (0 on padding)."""
    weights: torch.Tensor
    """float32 [N, K] target probabilities, 0 on padding (renormalised if asked)."""
    valid: torch.Tensor
    """bool [N, K] entries below `num_entries`."""
    head: torch.Tensor
    """bool [N, K] valid entries below `num_head`: exact teacher probabilities."""
    tail_mass: torch.Tensor
    """float32 [N] teacher mass outside the head entries."""
    label_hit: torch.Tensor
    """bool [N, K] the (first) valid entry equal to the position's label."""
    tail_scale: torch.Tensor
    """float32 [N] TAD's beta / (sequence mean of tail_mass); 0 where unused."""

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, sl: slice) -> LossTargets:
        """Positions `sl` (a slice)."""
        return LossTargets(**{f.name: getattr(self, f.name)[sl]
                              for f in dataclasses.fields(self)})


# ---------------------------------------------------------------------------- helpers

def _log_s(z_ids: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Student log-probabilities at the ids, [n, K]."""
    return z_ids - lse[:, None]


def _weights(t: LossTargets, like: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    w = t.weights.to(like.dtype)
    return w if mask is None else torch.where(mask, w, 0.0)


def _log_ghost(log_s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[n] log(1 - sum of s over `mask` + GHOST_EPS): the student's ghost-class log-mass."""
    fill = torch.finfo(log_s.dtype).min  # finite, so rows without entries keep finite grads
    log_in = torch.logsumexp(torch.where(mask, log_s, fill), dim=1)
    return torch.log(-torch.expm1(log_in.clamp_max(0.0)) + GHOST_EPS)


def _kl_rows(w: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """[n] sum_k w_k (log w_k - log s_k), with 0 log 0 = 0."""
    return (torch.xlogy(w, w) - w * log_s).sum(dim=1)


def _ghost_kl(log_s: torch.Tensor, t: LossTargets) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL over the head entries + ghost class [n], student ghost log-mass [n])."""
    w = _weights(t, log_s, t.head)
    g = t.tail_mass.to(log_s.dtype)
    log_ghost = _log_ghost(log_s, t.head)
    return _kl_rows(w, log_s) + torch.xlogy(g, g) - g * log_ghost, log_ghost


# ---------------------------------------------------------------------------- terms

def nll(z_ids: torch.Tensor, lse: torch.Tensor, z_label: torch.Tensor,
        t: LossTargets) -> torch.Tensor:
    """[n] soft cross-entropy -sum_k w_k log s_k."""
    return -(_weights(t, z_ids) * _log_s(z_ids, lse)).sum(dim=1)


def kl(z_ids: torch.Tensor, lse: torch.Tensor, z_label: torch.Tensor,
       t: LossTargets) -> torch.Tensor:
    """[n] forward KL sum_k w_k log(w_k / s_k) of the sparse target."""
    return _kl_rows(_weights(t, z_ids), _log_s(z_ids, lse))


def mse(z_ids: torch.Tensor, lse: torch.Tensor, z_label: torch.Tensor,
        t: LossTargets) -> torch.Tensor:
    """[n] sum_k (s_k - w_k)^2 over the target's valid entries."""
    diff = torch.exp(_log_s(z_ids, lse)) - _weights(t, z_ids)
    return torch.where(t.valid, diff * diff, 0.0).sum(dim=1)


def ghost(z_ids: torch.Tensor, lse: torch.Tensor, z_label: torch.Tensor,
          t: LossTargets) -> torch.Tensor:
    """[n] KL over the exact head entries plus a ghost class holding the rest."""
    return _ghost_kl(_log_s(z_ids, lse), t)[0]


def naive_fix(z_ids: torch.Tensor, lse: torch.Tensor, z_label: torch.Tensor,
              t: LossTargets) -> torch.Tensor:
    """[n] KL against the target with its residual mass moved onto the true token."""
    log_s = _log_s(z_ids, lse)
    w = _weights(t, z_ids)
    residual = (1.0 - w.sum(dim=1)).clamp_min(0.0)
    w_fix = w + residual[:, None] * t.label_hit
    off = torch.where(t.label_hit.any(dim=1), 0.0, residual)  # label outside the support
    return _kl_rows(w_fix, log_s) + torch.xlogy(off, off) - off * (z_label - lse)


def tad(z_ids: torch.Tensor, lse: torch.Tensor, z_label: torch.Tensor,
        t: LossTargets) -> torch.Tensor:
    """[n] TAD eq. 3: ghost KL over the head + tail_scale * g * KL of the renormalised tails."""
    log_s = _log_s(z_ids, lse)
    head, log_ghost = _ghost_kl(log_s, t)
    w = _weights(t, z_ids, t.valid & ~t.head)  # teacher tail probabilities (or estimates)
    g = t.tail_mass.to(z_ids.dtype)
    # g * KL(w / g || s_tail / ghost) = sum w log(w / g) - sum w (log s - log ghost)
    tail = (torch.xlogy(w, w).sum(dim=1) - torch.xlogy(w.sum(dim=1), g)
            - (w * (log_s - log_ghost[:, None])).sum(dim=1))
    return head + t.tail_scale.to(z_ids.dtype) * tail


Term = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, LossTargets], torch.Tensor]

#: Sparse KD losses by name: term(z_ids [n, K], lse [n], z_label [n], targets) -> [n].
KD_LOSSES: dict[str, Term] = {
    "nll": nll,
    "kl": kl,
    "mse": mse,
    "ghost": ghost,
    "naive_fix": naive_fix,
    "tad": tad,
}
#: Losses that read the exact head entries and the tail mass (not `sample` targets).
HEAD_LOSSES = ("ghost", "tad")
