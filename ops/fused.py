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
covered: an LM-head bias, logit soft-capping, dense FullKD (it needs dense
[N, V] teacher logits anyway; use `losses.full_kd_loss`).

This module knows nothing about models, optimisers or where targets come from.
"""

from __future__ import annotations

import torch

from logitcast.ops.kd_terms import KD_LOSSES, LossTargets
from logitcast.ops.losses import KDConfig, check_alpha, check_labels, loss_targets
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1 - alpha) * LM loss + alpha * sparse KD loss of logits = hidden @ weight.T, chunked.

    hidden: float [N, d] last hidden states (after the final norm); weight: [V, d] LM head,
    same dtype and device. targets: N positions of `SparseTargets` (None only when
    alpha = 0: then this is a fused cross-entropy). labels: int [N], `config.ignore_index`
    for positions that do not count. Returns (total scalar with a grad_fn,
    {"lm": ..., "kd": ...} detached scalars).
    """
    config = config or KDConfig()
    alpha = check_alpha(alpha)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 \
            or not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be a float [N, d] tensor, got "
                         f"{getattr(hidden, 'dtype', type(hidden))} "
                         f"{tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 \
            or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be a [V, {hidden.shape[1]}] tensor, got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) and hidden "
                         f"({hidden.dtype}, {hidden.device}) must share dtype and device")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    n, vocab = hidden.shape[0], weight.shape[0]
    counted = check_labels(labels, n, vocab, hidden.device, config.ignore_index)
    if targets is None and alpha != 0.0:
        raise ValueError(f"targets are required when alpha={alpha} > 0")
    t = None if targets is None else loss_targets(targets, labels, counted, config, vocab)
    total, lm, kd = _FusedDistill.apply(hidden, weight, labels, counted, t, alpha, config,
                                        chunk_size)
    return total, ({"lm": lm} if t is None else {"lm": lm, "kd": kd})


class _FusedDistill(torch.autograd.Function):
    """Forward computes the loss and (eagerly) d loss / d(hidden, weight); backward scales."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                counted: torch.Tensor, t: LossTargets | None, alpha: float, config: KDConfig,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, f32 = hidden.shape[0], torch.float32
        dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) \
            if need_h else None
        dw = torch.zeros(weight.shape, dtype=f32, device=weight.device) if need_w else None
        sums = torch.zeros(2, dtype=f32, device=hidden.device)
        denom = counted.sum().clamp_min(1).to(f32)
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
        ctx.save_for_backward(dh, None if dw is None else dw.to(weight.dtype))
        lm, kd = (sums[0] / denom).clone(), (sums[1] / denom).clone()
        total = (1.0 - alpha) * lm + alpha * kd
        ctx.mark_non_differentiable(lm, kd)
        return total, lm, kd

    @staticmethod
    def backward(ctx, g_total: torch.Tensor, g_lm: torch.Tensor, g_kd: torch.Tensor):
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh * g_total.to(dh.dtype),
                None if dw is None else dw * g_total.to(dw.dtype),
                None, None, None, None, None, None)


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
