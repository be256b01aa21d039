"""Thinning: fewer draws from stored samples, without the teacher, still unbiased.

A sampled position holds counts c_i over D draws from q. Keeping a uniformly
random subset of D' of those D draws (without replacement) gives counts c'_i
that are multivariate-hypergeometric with E[c'_i / D'] = c_i / D, so a target
made for one student (say 128 draws) yields an unbiased sparser one (say 32
draws, fewer unique tokens) for another. The subset is chosen by counter-based
uniforms per draw slot, so thinning is deterministic like sampling.

Exact head entries are kept as they are. This module knows nothing about codecs.
"""

from __future__ import annotations

import dataclasses

import torch

from logitcast.ops.blocks import row_sum
from logitcast.ops.rng import STREAM_THIN, uniforms
from logitcast.ops.targets import SparseTargets


def thin(
    targets: SparseTargets,
    draws: int,
    *,
    seed: int,
    row_keys: torch.Tensor,
    positions: torch.Tensor,
) -> SparseTargets:
    """Keep at most `draws` of each position's draws; positions with fewer are unchanged.

    row_keys, positions: int64 [N], as given to `sparsify` (any seed works; reuse the spec's).
    """
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an int >= 1, got {draws!r}")
    n, k = targets.ids.shape
    if tuple(row_keys.shape) != (n,) or tuple(positions.shape) != (n,):
        raise ValueError(f"row_keys and positions must have shape ({n},)")
    old_d = targets.draws.long()
    if n == 0 or int(old_d.max()) <= draws:
        return targets
    dev = targets.device
    cols = torch.arange(k, device=dev)[None, :]
    tail = (cols >= targets.num_head[:, None]) & (cols < targets.num_entries[:, None])
    counts = torch.where(tail, targets.counts.long(), 0)
    new_d = old_d.clamp(max=draws)

    dmax = int(old_d.max())
    slots = torch.arange(dmax, device=dev).expand(n, dmax).contiguous()
    owner = torch.searchsorted(counts.cumsum(dim=1), slots, right=True).clamp_(max=k - 1)
    u = uniforms(seed, row_keys.to(dev), positions.to(dev), dmax, stream=STREAM_THIN)
    u = torch.where(slots < old_d[:, None], u, 2.0)
    chosen = u.argsort(dim=1)[:, :draws]
    kept = torch.arange(draws, device=dev)[None, :] < new_d[:, None]
    new_counts = torch.zeros(n, k, dtype=torch.int64, device=dev)
    new_counts.scatter_add_(1, owner.gather(1, chosen), kept.long())

    mass = targets.tail_mass.double()[:, None]
    if targets.tail_from_counts:
        w = new_counts.double() / new_d.clamp_min(1).double()[:, None] * mass
    else:
        ratio = targets.weights.double() / counts.clamp_min(1).double()
        w = new_counts.double() * ratio
        w = w / row_sum(w).clamp_min(1e-300)[:, None] * mass
    weights = torch.where(tail, w.float(), targets.weights)

    drop = (tail & (new_counts == 0)) | (cols >= targets.num_entries[:, None])
    order = drop.int().argsort(dim=1, stable=True)
    keep = ~drop.gather(1, order)
    num = targets.num_head + (tail & (new_counts > 0)).sum(dim=1, dtype=torch.int32)
    width = int(num.max())
    return dataclasses.replace(
        targets,
        ids=torch.where(keep, targets.ids.gather(1, order), 0)[:, :width],
        weights=torch.where(keep, weights.gather(1, order), 0.0)[:, :width],
        counts=torch.where(keep, new_counts.gather(1, order), 0).to(torch.int32)[:, :width],
        num_entries=num,
        draws=new_d.to(torch.int32),
    )
