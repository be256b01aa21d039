"""Derive sparser targets from stored ones, without the teacher.

- sampled targets (`sample`, `head_tail`) -> fewer draws: hypergeometric thinning,
  still unbiased;
- `topk`/`top_p_k` -> `topk` with a smaller k: truncation of the sorted entries;
- `topk` at temperature tau -> `topk` at tau': p_i' ~ p_i ** (tau / tau') over the
  kept entries, scaled to keep their total mass. Approximate: the tail's mass at
  tau' is unknown without the teacher.
Anything else raises ValueError naming both specs. Pure tensor code.
"""

from __future__ import annotations

import dataclasses

import torch

from logitcast.ops.blocks import row_sum
from logitcast.ops.spec import TargetSpec
from logitcast.ops.targets import SparseTargets
from logitcast.ops.thinning import thin


def can_derive(have: TargetSpec, want: TargetSpec) -> bool:
    try:
        _plan(have, want)
    except ValueError:
        return False
    return True


def derive(targets: SparseTargets, have: TargetSpec, want: TargetSpec, *,
           row_keys: torch.Tensor, positions: torch.Tensor) -> SparseTargets:
    """Targets as `want` would have made them, from targets made with `have`."""
    plan = _plan(have, want)
    if plan == "same":
        return targets
    if plan == "thin":
        return thin(targets, want.draws, seed=want.seed, row_keys=row_keys, positions=positions)
    out = targets
    if plan in ("truncate", "truncate+retemper"):
        out = dataclasses.replace(
            out, ids=out.ids[:, :want.k], weights=out.weights[:, :want.k],
            counts=out.counts[:, :want.k], num_entries=out.num_entries.clamp(max=want.k),
            num_head=out.num_head.clamp(max=want.k))
    if plan.endswith("retemper"):
        w = out.weights.double()
        kept = row_sum(w)
        new = torch.where(w > 0, w.clamp_min(1e-300) ** (have.temperature / want.temperature), 0.0)
        out = dataclasses.replace(out, weights=(new / row_sum(new).clamp_min(1e-300)[:, None]
                                                * kept[:, None]).float())
    tail = (1.0 - row_sum(out.weights.double())).clamp(0.0, 1.0).float()
    return dataclasses.replace(out, tail_mass=tail)


def _plan(have: TargetSpec, want: TargetSpec) -> str:
    if have == want:
        return "same"
    if (have.method == want.method and have.method in ("sample", "head_tail")
            and want.draws is not None and have.draw_cap >= want.draws
            and have.proposal_t == want.proposal_t and have.temperature == want.temperature
            and (have.method == "sample" or have.k_head == want.k_head)):
        return "thin"
    # top-p-k with p < 1 may have cut a position below k entries: only p = 1 is a top-k
    exact_topk = have.method == "topk" or (have.method == "top_p_k" and have.p == 1.0)
    if exact_topk and want.method == "topk" and want.k <= have.k:
        return "truncate" if have.temperature == want.temperature else "truncate+retemper"
    raise ValueError(f"cannot derive targets for {want.key()} from stored {have.key()}")
