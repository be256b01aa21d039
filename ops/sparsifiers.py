"""Sparsifiers: teacher logits -> `SparseTargets`, one chunk of positions at a time.

Methods (see `TargetSpec`):
- `full`      dense distribution (tests, tiny vocabularies);
- `topk`      top-k teacher probabilities, raw (biased once renormalised);
- `top_p_k`   top-p prefix, then capped at k (PD paper, section 3.2);
- `sample`    RS-KD: draws from q ~ p**t, weights p/q (t = 1: counts / draws, unbiased;
              t != 1: self-normalised, consistent with an O(1/draws) bias);
- `head_tail` exact top-k head + draws from the renormalised tail, tail weights
              scaled by the tail mass: unbiased (t = 1) with lower variance than `sample`.

All randomness comes from `rng.uniforms(seed, row key, position, draw)`, and every
step is a per-row operation with explicit tie-breaking (equal probabilities go to
the lower token id), so a position's targets are identical whatever batch or
chunk it is computed in. A chunk reads its [chunk, V] logits and probabilities a
few times but writes one new [chunk, V] tensor, the softmax (more only for a padded
copy when V is not a multiple of 256, a temperature, or a proposal t != 1); all else
is per block of 256 tokens or per draw.

This module knows nothing about bytes (`codec`) or about where logits come from.
"""

from __future__ import annotations

import torch

from logitcast.ops.blocks import (
    BLOCK,
    blocked,
    groups,
    ordered_topk,
    row_sq_sum,
    row_sum,
    short_row_sum,
    top_ids,
)
from logitcast.ops.errors import InvalidSpecError, NonFiniteLogitsError
from logitcast.ops.rng import uniforms
from logitcast.ops.spec import TargetSpec
from logitcast.ops.targets import SparseTargets

#: Positions per chunk by default: peak extra memory ~ chunk * V * 8 bytes (softmax and
#: padded copy; up to 20 with a temperature and a proposal t != 1).
DEFAULT_CHUNK = 64
#: Largest vocabulary the ids (and the codec) support.
MAX_VOCAB = 1 << 24
_SUB = 16  # sub-blocks per block and tokens per sub-block: the CDF's middle level
_TOP_EXACT = 16  # largest proposal tokens whose contribution to E[unique] is computed exactly
_DRAW_SLICE = 128  # draws per inverse-CDF step: its working set is chunk * 128 * 16, whatever D


def row_positions(row_keys: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten B rows of seq_len positions: (keys int64 [B*T], positions int64 [B*T])."""
    keys = row_keys.to(torch.int64).repeat_interleave(seq_len)
    pos = torch.arange(seq_len, device=row_keys.device, dtype=torch.int64).repeat(len(row_keys))
    return keys, pos


def sparsify(
    logits: torch.Tensor,
    spec: TargetSpec,
    *,
    row_keys: torch.Tensor,
    positions: torch.Tensor,
    labels: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    entropy: bool = True,
) -> SparseTargets:
    """Sparse targets for N positions.

    logits: float [N, V] teacher logits (any float dtype/device; -inf marks impossible tokens).
    row_keys, positions: int64 [N], the coordinates of each position's random draws.
    labels: int64 [N] true next tokens (negative = unknown) for the log-prob extra, or None.
    entropy: compute the teacher-entropy extra (NaN when False; saves a pass over [N, V]).
    """
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float [N, V] tensor, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    n, vocab = logits.shape
    if not 1 <= vocab <= MAX_VOCAB:
        raise InvalidSpecError(f"vocab size {vocab} outside [1, {MAX_VOCAB}]")
    for name, t in (("row_keys", row_keys), ("positions", positions), ("labels", labels)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if labels is not None and bool((labels >= vocab).any()):
        raise ValueError(f"labels must be < vocab size {vocab}, got {int(labels.max())}")
    check_spec_vocab(spec, vocab)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    parts = []
    for start in range(0, max(n, 1), chunk_size):
        sl = slice(start, start + chunk_size)
        parts.append(_sparsify_chunk(
            logits[sl], spec, row_keys[sl].to(logits.device), positions[sl].to(logits.device),
            None if labels is None else labels[sl].to(logits.device), start, entropy,
        ))
    return SparseTargets.cat(parts)


def check_spec_vocab(spec: TargetSpec, vocab: int) -> None:
    if spec.method in ("topk", "top_p_k") and spec.k > vocab:
        raise InvalidSpecError(f"k={spec.k} exceeds the vocabulary size {vocab}")
    if spec.method == "head_tail" and spec.k_head > vocab:
        raise InvalidSpecError(f"k_head={spec.k_head} exceeds the vocabulary size {vocab}")


def _log(v: torch.Tensor) -> torch.Tensor:
    """Elementwise log of a short [n] vector, batch-invariant: every element goes through
    the same (SIMD) code path because each is computed in a 16-wide row of copies (one
    thread below 2,048 elements: sparsify chunks are far smaller)."""
    return torch.log(v[:, None].expand(len(v), 16).contiguous())[:, 0]


def _check_finite(x: torch.Tensor, x_max: torch.Tensor, offset: int) -> None:
    """Raise unless every row max is finite: NaN propagates into it, +inf shows, and
    -inf means the row has no finite logit."""
    if bool(torch.isfinite(x_max).all()):
        return
    bad = torch.isnan(x) | torch.isposinf(x)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise NonFiniteLogitsError(
            f"logit at position {offset + row}, token {col} is {float(x[row, col])}"
        )
    row = int(torch.isneginf(x_max).nonzero()[0, 0])
    raise NonFiniteLogitsError(f"position {offset + row} has no finite logit (all -inf)")


# ---------------------------------------------------------------------------- chunk

def _sparsify_chunk(
    logits: torch.Tensor,
    spec: TargetSpec,
    keys: torch.Tensor,
    pos: torch.Tensor,
    labels: torch.Tensor | None,
    offset: int,
    with_entropy: bool,
) -> SparseTargets:
    n, vocab = logits.shape
    # Pad the vocabulary to whole 256-token blocks with -inf (probability 0), once, so
    # the blocked sums, maxima and CDFs below are views, not copies of [n, V].
    if vocab % BLOCK == 0 and logits.dtype == torch.float32 and logits.is_contiguous():
        x = logits
    else:
        x = logits.new_empty(n, -(-vocab // BLOCK) * BLOCK, dtype=torch.float32)
        x[:, :vocab] = logits
        x[:, vocab:] = float("-inf")
    block_max = groups(x, BLOCK).amax(dim=2)  # the one pass that checks, and finds the top
    x_max = block_max.amax(dim=1)
    _check_finite(x, x_max, offset)
    # softmax / log_softmax run one row at a time; an elementwise exp() over [n, V] would
    # not be batch-invariant on CPU (SIMD body vs scalar tail give different last bits).
    p1 = torch.softmax(x, dim=1)
    # p at the arg max is exp(0) / Z: log Z without a log pass over [n, V]
    top_block = groups(p1, BLOCK)[torch.arange(n, device=x.device), block_max.argmax(dim=1)]
    log_p_max = _log(top_block.amax(dim=1))
    logprob = torch.full((n,), float("nan"), device=x.device)
    if labels is not None:  # log p(label) = x[label] - x_max + log p_max
        known = labels >= 0
        got = x.gather(1, labels.clamp_min(0).long()[:, None])[:, 0] - x_max
        logprob = torch.where(known, got + log_p_max, logprob)
    p = p1 if spec.temperature == 1.0 else torch.softmax(x / spec.temperature, dim=1)

    if spec.method == "full":
        ids = torch.arange(vocab, device=p.device, dtype=torch.int32).expand(n, vocab).clone()
        full = torch.full((n,), vocab, dtype=torch.int32, device=p.device)
        # a copy: the entropy pass below overwrites p1
        fields = {"ids": ids, "weights": p[:, :vocab].clone(), "counts": torch.zeros_like(ids),
                  "num_entries": full, "num_head": full, "draws": torch.zeros_like(full),
                  "tail_mass": torch.zeros(n, device=p.device)}
    elif spec.method in ("topk", "top_p_k"):
        fields = _top(x, block_max, p, spec)
    else:
        fields = _sampled(x, block_max, p, vocab, spec, keys, pos)
    entropy = (_entropy(p1, x, x_max, log_p_max, vocab) if with_entropy
               else torch.full((n,), float("nan"), device=x.device))
    return SparseTargets(**fields, entropy=entropy, logprob=logprob, vocab_size=vocab)


def _top(x: torch.Tensor, block_max: torch.Tensor, p: torch.Tensor, spec: TargetSpec) -> dict:
    """Fields of `topk` / `top_p_k` targets: the k most likely tokens, raw probabilities."""
    n = len(x)
    ids = ordered_topk(x, spec.k, block_max)  # logits order = tempered probability order
    w = p.gather(1, ids)
    num = torch.full((n,), spec.k, dtype=torch.int32, device=p.device)
    if spec.method == "top_p_k":
        keep = (w.cumsum(dim=1) - w) < spec.p
        num = keep.sum(dim=1, dtype=torch.int32)
        width = int(num.max()) if n else 0
        w = torch.where(keep, w, 0.0)[:, :width]
        ids = torch.where(keep, ids, 0)[:, :width]
    tail = (1.0 - row_sum(w.double())).clamp(0.0, 1.0).float()
    ids = ids.to(torch.int32)
    return {"ids": ids, "weights": w, "counts": torch.zeros_like(ids), "num_entries": num,
            "num_head": num, "draws": torch.zeros_like(num), "tail_mass": tail}


def _sampled(
    x: torch.Tensor,
    block_max: torch.Tensor,
    p: torch.Tensor,
    vocab: int,
    spec: TargetSpec,
    keys: torch.Tensor,
    pos: torch.Tensor,
) -> dict:
    """Fields of `sample` / `head_tail` targets (`sample` is head_tail with no head)."""
    k_head = spec.k_head if spec.method == "head_tail" else 0
    t = spec.proposal_t
    head = ordered_topk(x, k_head, block_max)
    # the values of the proposal's largest tail tokens, for the draw count: the largest
    # k_head + K values, less the head's (p and q follow x's order, and equal x give equal q)
    top = top_ids(x, block_max, min(k_head + _TOP_EXACT, vocab))
    q = p if t == 1.0 else torch.softmax(x * (t / spec.temperature), dim=1)
    q_top = q.gather(1, top[:, k_head:])
    head_w = p.gather(1, head)
    mass = ((1.0 - row_sum(head_w.double())).clamp_min(0.0) if k_head
            else torch.ones(len(x), dtype=torch.float64, device=x.device))
    q.scatter_(1, head, 0.0)  # the tail, in place (q may be p itself: restored below)
    ids, w, counts, num, draws = _sample(p, q, q_top, mass, spec, keys, pos)
    if q is p:
        q.scatter_(1, head, head_w)
    return {
        "ids": torch.cat([head.to(torch.int32), ids], dim=1),
        "weights": torch.cat([head_w, w], dim=1),
        "counts": torch.cat([torch.zeros_like(head, dtype=torch.int32), counts], dim=1),
        "num_entries": num + k_head, "num_head": torch.full_like(num, k_head), "draws": draws,
        "tail_mass": mass.float(), "tail_from_counts": t == 1.0,
    }


def _entropy(
    p: torch.Tensor, x: torch.Tensor, x_max: torch.Tensor, log_p_max: torch.Tensor, vocab: int
) -> torch.Tensor:
    """float32 [n] teacher entropy H = -log p_max + sum_i p_i (x_max - x_i), p = softmax(x),
    with sum_i p_i = 1 up to rounding. Overwrites p: the products p_i x_i are formed in
    place, so no new [n, V] tensor (pad columns keep p = 0)."""
    p[:, :vocab].mul_(x[:, :vocab])
    sums = groups(p, BLOCK).sum(dim=2)
    if bool(sums.isnan().any()):  # 0 * -inf at impossible tokens: those products are 0
        sums = groups(p.nan_to_num_(nan=0.0), BLOCK).sum(dim=2)
    mean_x = sums.double().cumsum(dim=1)[:, -1]  # blocked sums: see `row_sum`
    return (x_max.double() - mean_x - log_p_max.double()).float()


# ---------------------------------------------------------------------------- pieces

def draws_for_unique(
    top: torch.Tensor, sq_sum: torch.Tensor, target: float, max_draws: int
) -> torch.Tensor:
    """int64 [n]: the draws D <= max_draws whose E[#distinct tokens] is closest to target.

    top: [n, K] the proposal's K largest probabilities; sq_sum: [n] the sum of all its
    squared probabilities (both normalised, float64). E[unique](D) = sum_i 1 - (1 - q_i)^D,
    exact over `top`; the rest is treated as s1^2/s2 equal tokens that match its first
    two moments. D depends only on q, so the estimator stays unbiased.
    """
    top = top.double()
    s1 = (1.0 - short_row_sum(top)).clamp_min(0.0)
    s2 = (sq_sum.double() - short_row_sum(top * top)).clamp_min(1e-300)
    log1m_top = torch.log1p(-top.clamp(max=1.0 - 1e-12))
    n_eff = s1 * s1 / s2
    log1m_eff = torch.log1p(-(s2 / s1.clamp_min(1e-300)).clamp(max=1.0 - 1e-12))

    def expected_unique(d: torch.Tensor) -> torch.Tensor:
        d = d.double()
        # exponents clamped at -60: (1 - q)^D below e^-60 is 0 here, and denormals are slow
        exact = short_row_sum(1.0 - torch.exp((log1m_top * d[:, None]).clamp_min(-60.0)))
        return exact + n_eff * (1.0 - torch.exp((log1m_eff * d).clamp_min(-60.0)))

    lo = torch.ones(top.shape[0], dtype=torch.int64, device=top.device)
    hi = torch.full_like(lo, max_draws)
    while bool((lo < hi).any()):
        mid = (lo + hi) // 2
        ok = expected_unique(mid) >= target
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid + 1)
    # lo is the fewest draws reaching the target; one fewer may land closer to it, so the
    # average number of distinct tokens matches the target rather than exceeding it
    below = (lo - 1).clamp_min(1)
    closer = (target - expected_unique(below)) < (expected_unique(lo) - target)
    return torch.where(closer & (lo > 1), below, lo)


def cdf_levels(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper levels of q's three-level CDF, from one read of q [n, V] (V a multiple
    of 256): float32 [n, V/256, 16] sub-block sums, and float64 [n, V/256] the
    cumulative sums of the 256-token blocks (its last column is q's row total)."""
    sub = _subblocks(q).sum(dim=2)
    return sub, sub.sum(dim=2).double().cumsum(dim=1)


def _subblocks(q: torch.Tensor) -> torch.Tensor:
    """[n, V] -> [n, V/256, 16, 16]: [:, b, :, s] is sub-block s of block b, the block's
    tokens s, s + 16, ..., s + 240 (a strided sub-block sums with plain SIMD adds, about
    twice as fast as a sum over 16 adjacent tokens)."""
    return q.view(q.shape[0], q.shape[1] // BLOCK, BLOCK // _SUB, _SUB)


def inverse_cdf(
    q: torch.Tensor,
    u: torch.Tensor,
    levels: tuple[torch.Tensor, torch.Tensor] | None = None,
    draws: torch.Tensor | None = None,
) -> torch.Tensor:
    """int64 [n, D]: token drawn for each uniform, P(token i) = q_i / sum(q).

    q: float [n, V] non-negative weights; u: float64 [n, D] in [0, 1); levels: q's
    `cdf_levels` if already computed; draws: int64 [n], how many of its uniforms each
    row uses (all if None; unused ones come back as the padded width, no token).
    Three levels: a float64 CDF across blocks of 256 tokens (tiny tail probabilities
    keep their share: a flat float32 cumsum over 150k tokens would round them away),
    then the block's 16 sub-block sums, then the sub-block's 16 tokens; so the CDF
    runs over a block's tokens in `_subblocks` order (0, 16, ..., 240, 1, 17, ...).
    A draw reads 32 weights, and draws go 128 per row at a time, so the working set is
    n * 128 * 16 whatever D. Zero-weight tokens are never drawn.
    """
    n, d = u.shape
    q = blocked(q.float()).flatten(1)
    sub, cdf = cdf_levels(q) if levels is None else levels
    tokens = _subblocks(q)
    total = cdf[:, -1:]
    last = torch.nextafter(total, torch.zeros_like(total))
    out = torch.full((n, d), q.shape[1], dtype=torch.int64, device=q.device)
    for s in range(0, d, _DRAW_SLICE):
        target = torch.minimum(u[:, s:s + _DRAW_SLICE] * total, last)
        b = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
        rest = target - torch.where(b > 0, cdf.gather(1, (b - 1).clamp_min(0)), 0.0)
        used = torch.ones_like(b, dtype=torch.bool) if draws is None else (
            torch.arange(s, s + b.shape[1], device=q.device)[None, :] < draws[:, None])
        row, col = used.nonzero(as_tuple=True)
        b, rest = b[row, col], rest[row, col]
        j, rest = _descend(sub[row, b], rest)
        k, _ = _descend(tokens[row, b, :, j], rest)
        out[row, s + col] = b * BLOCK + k * _SUB + j
    return out


def _descend(weights: torch.Tensor, rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One CDF level for P draws: the member of each draw's group (weights [P, w]) where
    the float64 offset `rest` [P] falls, and the offset left inside that member."""
    c = weights.double().cumsum(dim=1)
    j = torch.searchsorted(c, rest[:, None], right=True)[:, 0]
    past = j == c.shape[1]
    if bool(past.any()):
        # rounding left rest at or past the group's total: take its last member of
        # positive weight (the first to reach the total), never a zero-weight one
        j = torch.where(past, (c < c[:, -1:]).sum(dim=1), j)
    before = torch.where(j > 0, c.gather(1, (j - 1).clamp_min(0)[:, None])[:, 0], 0.0)
    return j, rest - before


def _sample(
    p: torch.Tensor,
    q: torch.Tensor,
    q_top: torch.Tensor,
    mass: torch.Tensor,
    spec: TargetSpec,
    keys: torch.Tensor,
    pos: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Draw from the proposal q (p itself when t = 1, else ~ p**t; unnormalised is fine);
    importance weights p/q, normalised and scaled to `mass` (float64 [n]) per position.
    q_top: float [n, K] q's largest values, for the draw count.

    Returns ids int32 [n, K], weights float32 [n, K], counts int32 [n, K],
    num_entries int32 [n], draws int32 [n]. Positions with zero mass get no draws.
    """
    n, width = q.shape  # width: the padded vocabulary, also the "no draw" sentinel
    levels = cdf_levels(q)
    total = levels[1][:, -1]
    if spec.draws is not None:
        draws = torch.full((n,), spec.draws, dtype=torch.int64, device=q.device)
    else:
        scale = total.clamp_min(1e-300)
        draws = draws_for_unique(q_top.double() / scale[:, None],
                                 row_sq_sum(q).double() / (scale * scale),
                                 spec.unique, spec.max_draws)
    draws = torch.where((mass > 0) & (total > 0), draws, 0)
    dmax = int(draws.max()) if n else 0
    u = uniforms(spec.seed, keys, pos, dmax)

    drawn, _ = inverse_cdf(q, u, levels, draws).sort(dim=1)
    valid = drawn < width
    first = torch.ones_like(valid)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    seg = first.long().cumsum(dim=1) - 1
    num = (first & valid).sum(dim=1, dtype=torch.int32)
    width = int(num.max()) if n else 0
    counts = torch.zeros(n, dmax, dtype=torch.int64, device=q.device)
    counts = counts.scatter_add_(1, seg, valid.long())[:, :width]
    ids = torch.zeros(n, dmax, dtype=torch.int64, device=q.device)
    ids = ids.scatter_(1, seg, torch.where(valid, drawn, 0))[:, :width]

    d = draws.clamp_min(1).double()[:, None]
    if spec.proposal_t == 1.0:
        w = counts.double() / d
    else:
        ratio = p.gather(1, ids).double() / (q.gather(1, ids).double() / total[:, None])
        w = counts.double() * ratio.nan_to_num(0.0)
        w = w / row_sum(w).clamp_min(1e-300)[:, None]
    w = (w * mass[:, None]).float()
    return ids.to(torch.int32), w, counts.to(torch.int32), num, draws.to(torch.int32)
