"""Fused chunked distillation loss: LM loss + sparse KD from the last hidden state.

    total = (1 - alpha) * L_lm + alpha * L_kd,   logits = hidden @ weight.T

computed without ever holding the [N, V] logits: positions go through in
chunks; for each chunk the [c, V] logits are formed in fp32, reduced to the
three small tensors every KD term needs (logsumexp, a gather at the K target
ids, the label logit; see `kd_terms`), the LM and KD terms are evaluated with
autograd on those small tensors only, and their gradients become the logit
gradient by hand:

    dz = softmax(z) * dL/dlse + scatter(dL/dz_ids at ids) + scatter(dL/dz_label at label)

which is multiplied into dh (chunk rows) and accumulated into dW (fp32) right
away. The forward pass therefore does the backward work eagerly (as Liger's
and Apple's cut-cross-entropy kernels do); `backward` only scales the stored
gradients by the incoming one. Peak extra memory is a few [chunk, V] fp32
buffers plus an fp32 [V, d] accumulator. Works for fp32 and bf16/fp16
hidden states and weights on any device (logits and gradient sums in fp32).

Same values and gradients as `losses.distill_loss` on hidden @ weight.T. Not
covered: an LM-head bias, logit soft-capping.

`fused_full_kd_loss` is the dense FullKD reference done the same way: the
teacher's logits are formed chunk by chunk from its last hidden state too, so
neither model's [N, V] logits are ever held; same values and gradients as
`losses.full_kd_loss`.

This module knows nothing about models, optimisers or where targets come from.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from logitcast.ops.kd_terms import KD_LOSSES, LossTargets
from logitcast.ops.losses import (
    IGNORE_INDEX,
    KDConfig,
    _check_positive,
    check_alpha,
    check_labels,
    loss_targets,
)
from logitcast.ops.targets import SparseTargets

#: Positions per chunk by default: each [chunk, V] fp32 buffer is chunk * V * 4 bytes.
DEFAULT_CHUNK = 512


def fused_distill_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: SparseTargets | None,
    labels: torch.Tensor,
    *,
    alpha: float,
    config: KDConfig | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    on_logits: Callable[[torch.Tensor, int], None] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1 - alpha) * LM loss + alpha * sparse KD loss of logits = hidden @ weight.T, chunked.

    hidden: float [N, d] last hidden states (after the final norm); weight: [V, d] LM head,
    same dtype and device. targets: N positions of `SparseTargets` (None only when
    alpha = 0: then this is a fused cross-entropy). labels: int [N], `config.ignore_index`
    for positions that do not count. on_logits: called as on_logits(z, start) with each
    chunk's fp32 logits z [c, V] (positions start..start+c-1, exactly `linear(h, weight)`
    cast to fp32) before the loss consumes them; it must not keep or modify z (the
    teacher-recording mode sparsifies them here instead of forming them again).
    Returns (total scalar with a grad_fn, {"lm": ..., "kd": ...} detached scalars).
    """
    config = config or KDConfig()
    alpha = check_alpha(alpha)
    _check_head("hidden", hidden, "weight", weight)
    _check_chunk(chunk_size)
    n, vocab = hidden.shape[0], weight.shape[0]
    counted = check_labels(labels, n, vocab, hidden.device, config.ignore_index)
    if targets is None and alpha != 0.0:
        raise ValueError(f"targets are required when alpha={alpha} > 0")
    t = None if targets is None else loss_targets(targets, labels, counted, config, vocab)
    total, lm, kd = _FusedDistill.apply(hidden, weight, labels, counted, t, alpha, config,
                                        chunk_size, on_logits)
    return total, ({"lm": lm} if t is None else {"lm": lm, "kd": kd})


def _check_head(h_name: str, hidden: torch.Tensor, w_name: str, weight: torch.Tensor) -> None:
    """ValueError naming the argument unless hidden is float [N, d] and weight [V, d] alike."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 \
            or not hidden.dtype.is_floating_point:
        raise ValueError(f"{h_name} must be a float [N, d] tensor, got "
                         f"{getattr(hidden, 'dtype', type(hidden))} "
                         f"{tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 \
            or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{w_name} must be a [V, {hidden.shape[1]}] tensor, got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"{w_name} ({weight.dtype}, {weight.device}) and {h_name} "
                         f"({hidden.dtype}, {hidden.device}) must share dtype and device")


def _check_chunk(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


def fused_full_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dense FullKD, chunked: (1 - alpha) * LM loss + alpha * KL(softmax(t) || softmax(z / tau))
    with z = hidden @ weight.T and t = (teacher_hidden @ teacher_weight.T) in fp32.

    The teacher logits are exactly what its `lm_head` (a bias-free `nn.Linear`) would return,
    upcast to fp32; the teacher gets no gradient. hidden: float [N, d], weight: [V, d] (the
    student's LM head); teacher_hidden: [N, d_t], teacher_weight: [V, d_t], any float dtype
    (the vocabularies must match). Returns (total with a grad_fn, {"lm", "kd"} detached).
    """
    alpha = check_alpha(alpha)
    _check_positive("temperature", temperature)
    _check_head("hidden", hidden, "weight", weight)
    _check_head("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)
    _check_chunk(chunk_size)
    if teacher_hidden.shape[0] != hidden.shape[0] or teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"teacher ({teacher_hidden.shape[0]} positions, vocabulary "
                         f"{teacher_weight.shape[0]}) does not match the student "
                         f"({hidden.shape[0]} positions, vocabulary {weight.shape[0]})")
    if teacher_hidden.device != hidden.device:
        raise ValueError(f"teacher_hidden is on {teacher_hidden.device}, the student on "
                         f"{hidden.device}")
    counted = check_labels(labels, hidden.shape[0], weight.shape[0], hidden.device,
                           ignore_index)
    total, lm, kd = _FusedFullKD.apply(hidden, weight, teacher_hidden.detach(),
                                       teacher_weight.detach(), labels, counted, alpha,
                                       float(temperature), chunk_size)
    return total, {"lm": lm, "kd": kd}


# Both fused losses do the backward work in their forward pass: these are the shared
# parts (gradient buffers, the returned triple, and a backward that only scales).

def _eager_buffers(ctx, hidden: torch.Tensor, weight: torch.Tensor, counted: torch.Tensor):
    """(dh or None, fp32 dw or None, fp32 [2] loss sums, fp32 counted-position count)."""
    f32 = torch.float32
    dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) \
        if ctx.needs_input_grad[0] else None
    dw = torch.zeros(weight.shape, dtype=f32, device=weight.device) \
        if ctx.needs_input_grad[1] else None
    return (dh, dw, torch.zeros(2, dtype=f32, device=hidden.device),
            counted.sum().clamp_min(1).to(f32))


def _eager_result(ctx, dh, dw, weight: torch.Tensor, sums: torch.Tensor,
                  denom: torch.Tensor, alpha: float):
    """Save the gradients for `_eager_backward`; return (total, lm, kd)."""
    ctx.save_for_backward(dh, None if dw is None else dw.to(weight.dtype))
    ctx.num_inputs = len(ctx.needs_input_grad)
    lm, kd = (sums[0] / denom).clone(), (sums[1] / denom).clone()
    total = (1.0 - alpha) * lm + alpha * kd
    ctx.mark_non_differentiable(lm, kd)
    return total, lm, kd


def _eager_backward(ctx, g_total: torch.Tensor, g_lm: torch.Tensor, g_kd: torch.Tensor):
    """d/d(hidden, weight): the stored gradients times the incoming one; nothing else."""
    dh, dw = ctx.saved_tensors
    return (None if dh is None else dh * g_total.to(dh.dtype),
            None if dw is None else dw * g_total.to(dw.dtype),
            *[None] * (ctx.num_inputs - 2))


class _FusedFullKD(torch.autograd.Function):
    """Forward computes the loss and (eagerly) d loss / d(hidden, weight); backward scales.

    Per position (counted ones, then / their number):
        lm = lse(z) - z_y,  kd = sum_v p_v (log p_v - log softmax(z / tau)_v)
        d/dz = (1 - alpha) (softmax(z) - onehot_y) + alpha / tau (softmax(z / tau) - p)
    evaluated in three [chunk, V] fp32 buffers reused by every chunk, all in place: with t
    the teacher's fp32 logits, t' = t - max t, P = exp(t'), s = sum P (so p = P / s),
    z' = z - max z and S_tau = sum exp(z' / tau),
        lm = log S_1 - z'_y,  kd = P . (t' - z' / tau) / s - log s + log S_tau
    (the row dot as an in-place product and a row sum). Tokens where p underflows to 0 (or
    the teacher's logit is -inf) add exactly 0 to kd and nothing to the gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, t_weight, labels, counted, alpha: float,
                tau: float, chunk: int):
        n, f32 = hidden.shape[0], torch.float32
        dh, dw, sums, denom = _eager_buffers(ctx, hidden, weight, counted)
        safe = torch.where(counted, labels, 0).long()
        # student logits (then their gradient), teacher logits (then scratch), exp of the
        # teacher's: fresh [chunk, V] tensors would pay page faults (CPU) or allocator churn
        z_buf, t_buf, p_buf = (torch.empty(min(chunk, n), weight.shape[0], dtype=f32,
                                           device=hidden.device) for _ in range(3))
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            h, keep = hidden[sl], counted[sl]
            z, t, p = z_buf[: h.shape[0]], t_buf[: h.shape[0]], p_buf[: h.shape[0]]
            _logits_into(z, h, weight)
            _logits_into(t, t_hidden[sl], t_weight)
            t.sub_(t.amax(dim=1, keepdim=True))  # t'
            s = torch.exp(t, out=p).sum(dim=1)  # p holds P = exp(t')
            z.sub_(z.amax(dim=1, keepdim=True))  # z'
            z_label = z.gather(1, safe[sl, None])[:, 0]
            # P . (t' - z' / tau), t consumed; nansum: a -inf teacher logit gives P = 0, term 0
            dot = torch.nansum(t.sub_(z, alpha=1.0 / tau).mul_(p), dim=1)
            e_tau = None if tau == 1.0 else torch.div(z, tau, out=t).exp_()  # exp(z' / tau)
            s_tau = None if e_tau is None else e_tau.sum(dim=1)
            e = z.exp_()  # exp(z'); z consumed
            s_1 = e.sum(dim=1)
            lm = s_1.log() - z_label
            kd = dot / s - s.log() + (s_1 if s_tau is None else s_tau).log()
            sums += torch.stack([torch.where(keep, lm, 0.0).sum(),
                                 torch.where(keep, kd, 0.0).sum()])
            if dh is None and dw is None:
                continue
            # d total / dz, built in e's (z's) buffer; each row times keep / denom
            scale = keep.to(f32) / denom
            if e_tau is None:
                g = e.mul_((scale / s_1)[:, None])  # (1 - alpha) q + alpha q
            else:
                g = e.mul_(((1.0 - alpha) * scale / s_1)[:, None])
                g.addcmul_(e_tau, ((alpha / tau) * scale / s_tau)[:, None])
            g.addcmul_(p, (-(alpha / tau) * scale / s)[:, None])
            g.scatter_add_(1, safe[sl, None], ((alpha - 1.0) * scale)[:, None])
            gh = g
            if hidden.dtype != f32:
                gh = g.to(hidden.dtype)
                if dw is not None:
                    g.copy_(gh)  # dW from the rounded gradient too, summed in fp32
            if dh is not None:
                torch.mm(gh, weight, out=dh[sl])
            if dw is not None:
                dw.addmm_(g.t(), h if h.dtype == f32 else h.to(f32))
        return _eager_result(ctx, dh, dw, weight, sums, denom, alpha)

    backward = staticmethod(_eager_backward)


def _logits_into(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> None:
    """out (fp32 [c, V]) = linear(h, weight) cast to fp32; no temporary when h is fp32."""
    if h.dtype == torch.float32:
        torch.mm(h, weight.T, out=out)
    else:
        out.copy_(torch.nn.functional.linear(h, weight))


class _FusedDistill(torch.autograd.Function):
    """Forward computes the loss and (eagerly) d loss / d(hidden, weight); backward scales."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                counted: torch.Tensor, t: LossTargets | None, alpha: float, config: KDConfig,
                chunk: int, on_logits: Callable | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, f32 = hidden.shape[0], torch.float32
        dh, dw, sums, denom = _eager_buffers(ctx, hidden, weight, counted)
        need_h, need_w = dh is not None, dw is not None
        safe = torch.where(counted, labels, 0).long()
        # one [chunk, V] fp32 buffer for every chunk's logits and logit gradient: fresh
        # allocations would pay page faults (CPU) or allocator churn on each chunk
        buf = torch.empty(min(chunk, n), weight.shape[0], dtype=f32, device=hidden.device)
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            h = hidden[sl]
            z = buf[: h.shape[0]]
            if h.dtype == f32:
                torch.mm(h, weight.T, out=z)
            else:
                z.copy_(h @ weight.T)
            if on_logits is not None:
                on_logits(z, start)
            dz = _chunk_grad(z, safe[sl], counted[sl], None if t is None else t[sl], alpha,
                             config, denom, sums, need_h or need_w)
            if dz is None:
                continue
            g = dz if dz.dtype == hidden.dtype else dz.to(hidden.dtype)
            if dh is not None:
                torch.mm(g, weight, out=dh[sl])
            if dw is not None:
                if h.dtype == f32:
                    dw.addmm_(g.t(), h)
                else:
                    dw.add_(g.t() @ h)  # product rounded once per chunk, summed in fp32
        return _eager_result(ctx, dh, dw, weight, sums, denom, alpha)

    backward = staticmethod(_eager_backward)


def _chunk_grad(z: torch.Tensor, labels: torch.Tensor, counted: torch.Tensor,
                t: LossTargets | None, alpha: float, config: KDConfig, denom: torch.Tensor,
                sums: torch.Tensor, need_grad: bool) -> torch.Tensor | None:
    """Loss sums of one chunk added into `sums`; returns d total / d z (fp32 [c, V], in z's
    buffer) or None when no gradient is needed. z: fp32 [c, V] logits, consumed."""
    tau = config.temperature
    top = z.amax(dim=1, keepdim=True)
    z_label = z.gather(1, labels[:, None])[:, 0]
    z_ids = None if t is None else z.gather(1, t.ids)
    exp_t = None
    if t is not None and tau != 1.0:
        exp_t = (z - top).div_(tau).exp_()  # exp((z - max) / tau)
        sum_t = exp_t.sum(dim=1)
        lse_t = top[:, 0] / tau + sum_t.log()
    exp = z.sub_(top).exp_()  # z is consumed from here on
    sum_e = exp.sum(dim=1)
    lse = top[:, 0] + sum_e.log()

    with torch.enable_grad():
        lse_l = lse.detach().requires_grad_(need_grad)
        label_l = z_label.detach().requires_grad_(need_grad)
        leaves = [lse_l, label_l]
        lm = torch.where(counted, lse_l - label_l, 0.0).sum()
        kd = torch.zeros((), dtype=lm.dtype, device=lm.device)
        if t is not None:
            ids_l = z_ids.detach().requires_grad_(need_grad)
            leaves.append(ids_l)
            if exp_t is None:
                per_pos = KD_LOSSES[config.loss](ids_l, lse_l, label_l, t)
            else:
                lse_t_l = lse_t.detach().requires_grad_(need_grad)
                leaves.append(lse_t_l)
                per_pos = KD_LOSSES[config.loss](ids_l / tau, lse_t_l, label_l / tau, t)
            kd = torch.where(counted, per_pos, 0.0).sum()
        sums += torch.stack([lm.detach(), kd.detach()])
        if not need_grad:
            return None
        grads = torch.autograd.grad(((1.0 - alpha) * lm + alpha * kd) / denom, leaves,
                                    allow_unused=True, materialize_grads=True)

    dz = exp.mul_((grads[0] / sum_e)[:, None])  # softmax(z) * dL/dlse
    if exp_t is not None:
        dz.add_(exp_t.mul_((grads[3] / (sum_t * tau))[:, None]))  # d lse_t / dz = softmax(z/tau)/tau
    dz.scatter_add_(1, labels[:, None], grads[1][:, None])
    if t is not None:
        dz.scatter_add_(1, t.ids, grads[2])
    return dz
