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
few times but writes one new [chunk, V] tensor, the softmax (plus the padded copy
when V is not a multiple of 256, and one more for a temperature or proposal t != 1);
everything else is per block of 256 tokens or per draw.

This module knows nothing about bytes (`codec`) or about where logits come from.
"""

from __future__ import annotations

import torch

from logitcast.ops.errors import InvalidSpecError, NonFiniteLogitsError
from logitcast.ops.rng import uniforms
from logitcast.ops.spec import TargetSpec
from logitcast.ops.targets import SparseTargets

#: Positions per chunk by default: peak extra memory ~ chunk * V * 8 bytes.
DEFAULT_CHUNK = 64
#: Largest vocabulary the ids (and the codec) support.
MAX_VOCAB = 1 << 24
_BLOCK = 256  # tokens per block: batch-invariant sums, block maxima, top level of the CDF
_SUB = 16  # tokens per sub-block, the CDF's middle level: a draw reads 16 + 16 weights
_TOP_EXACT = 16  # largest proposal tokens whose contribution to E[unique] is computed exactly
_DRAW_SLICE = 64  # draws per inverse-CDF step: its working set is chunk * 64 * 16, whatever D


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
    if vocab % _BLOCK == 0 and logits.dtype == torch.float32 and logits.is_contiguous():
        x = logits
    else:
        x = logits.new_empty(n, -(-vocab // _BLOCK) * _BLOCK, dtype=torch.float32)
        x[:, :vocab] = logits
        x[:, vocab:] = float("-inf")
    block_max = _groups(x, _BLOCK).amax(dim=2)  # the one pass that checks, and finds the top
    x_max = block_max.amax(dim=1)
    _check_finite(x, x_max, offset)
    # softmax / log_softmax run one row at a time; an elementwise exp() over [n, V] would
    # not be batch-invariant on CPU (SIMD body vs scalar tail give different last bits).
    p1 = torch.softmax(x, dim=1)
    # p at the arg max is exp(0) / Z: log Z without a log pass over [n, V]
    top_block = _groups(p1, _BLOCK)[torch.arange(n, device=x.device), block_max.argmax(dim=1)]
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
    # the head and the proposal's largest tail tokens (for the draw count), found together
    top = ordered_topk(x, min(k_head + _TOP_EXACT, vocab), block_max)
    head = top[:, :k_head]
    q = p if t == 1.0 else torch.softmax(x * (t / spec.temperature), dim=1)
    q_top = q.gather(1, top[:, k_head:])
    head_w = p.gather(1, head)
    mass = (1.0 - row_sum(head_w.double())).clamp_min(0.0)
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
    sums = _groups(p, _BLOCK).sum(dim=2)
    if bool(sums.isnan().any()):  # 0 * -inf at impossible tokens: those products are 0
        sums = _groups(p.nan_to_num_(nan=0.0), _BLOCK).sum(dim=2)
    mean_x = sums.double().cumsum(dim=1)[:, -1]  # blocked sums: see `row_sum`
    return (x_max.double() - mean_x - log_p_max.double()).float()


# ---------------------------------------------------------------------------- pieces

def row_sum(x: torch.Tensor) -> torch.Tensor:
    """[n, V] -> [n] sums that do not depend on n (torch.sum splits long rows across
    threads differently for different batch sizes): sums of fixed 256-wide blocks,
    then a sequential cumsum over blocks."""
    return _blocked(x).sum(dim=2).cumsum(dim=1)[:, -1]


def row_sq_sum(x: torch.Tensor) -> torch.Tensor:
    """[n, V] -> [n] sums of squares, batch-invariant like `row_sum`, in one pass."""
    return (torch.linalg.vector_norm(_blocked(x), dim=2) ** 2).cumsum(dim=1)[:, -1]


def _blocked(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """[n, V] -> [n, ceil(V / 256), 256], padded with `fill`; a view when V divides evenly."""
    n, width = x.shape
    nb = max(1, -(-width // _BLOCK))
    if nb * _BLOCK == width:
        return x.reshape(n, nb, _BLOCK)
    out = x.new_empty(n, nb * _BLOCK)
    out[:, :width] = x
    out[:, width:] = fill
    return out.view(n, nb, _BLOCK)


def _groups(x: torch.Tensor, w: int) -> torch.Tensor:
    """[n, V] -> [n, V / w, w], a view (V a multiple of w)."""
    return x.view(x.shape[0], x.shape[1] // w, w)


def ordered_topk(x: torch.Tensor, k: int, block_max: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [n, k] ids of the k largest values per row, by descending value, ties to
    the lower id, so the choice is independent of the topk kernel, batch and device.

    block_max: float [n, ceil(V / 256)] maxima of x's 256-token blocks, if known. The k
    winners lie in the k blocks with the largest maxima (ties to the lower block), so a
    row with many more blocks than k is searched only there.
    """
    n, vocab = x.shape
    x = x.float()
    if 2 * k > -(-vocab // _BLOCK):
        return _ordered_topk_rows(x, k)
    blocked = _blocked(x, float("-inf"))
    if block_max is None:
        block_max = blocked.amax(dim=2)
    # ascending block ids, so a candidate's column order is its token id order
    blocks = ordered_topk(block_max, k).sort(dim=1).values
    rows = torch.arange(n, device=x.device)[:, None]
    local = _ordered_topk_rows(blocked[rows, blocks].reshape(n, k * _BLOCK), k)
    return blocks.gather(1, local // _BLOCK) * _BLOCK + local % _BLOCK


def _ordered_topk_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """`ordered_topk` over whole rows. Fast path: a plain topk(k + 1) settles every row
    whose k-th and (k+1)-th values differ; rows with a tie across that boundary are
    re-ranked on an exact int64 key (order-preserving float bits, then reversed id)."""
    vocab = x.shape[1]
    vals, ids = x.topk(min(k + 1, vocab), dim=1, sorted=True)
    if k < vocab:
        boundary_tie = vals[:, k - 1] == vals[:, k]
        vals, ids = vals[:, :k], ids[:, :k]
        if bool(boundary_tie.any()):
            rows = boundary_tie.nonzero()[:, 0]
            ids = ids.clone()
            ids[rows] = _exact_topk(x[rows], k)
            vals = x.gather(1, ids)
    ids, order = ids.sort(dim=1)
    vals = vals.gather(1, order)
    order = vals.sort(dim=1, descending=True, stable=True).indices
    return ids.gather(1, order)


def _exact_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    bits = x.contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    ids = torch.arange(x.shape[1], device=x.device, dtype=torch.int64)
    key = ordered * MAX_VOCAB + (MAX_VOCAB - 1 - ids)
    return key.topk(k, dim=1, sorted=True).indices


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
    s1 = (1.0 - row_sum(top)).clamp_min(0.0)
    s2 = (sq_sum.double() - row_sum(top * top)).clamp_min(1e-300)
    log1m_top = torch.log1p(-top.clamp(max=1.0 - 1e-12))
    n_eff = s1 * s1 / s2
    log1m_eff = torch.log1p(-(s2 / s1.clamp_min(1e-300)).clamp(max=1.0 - 1e-12))

    def expected_unique(d: torch.Tensor) -> torch.Tensor:
        d = d.double()
        # exponents clamped at -60: (1 - q)^D below e^-60 is 0 here, and denormals are slow
        exact = row_sum(1.0 - torch.exp((log1m_top * d[:, None]).clamp_min(-60.0)))
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
    of 256): float32 [n, V/16] sums of 16-token sub-blocks, and float64 [n, V/256] the
    cumulative sums of the 256-token blocks (its last column is q's row total)."""
    sub = _groups(q, _SUB).sum(dim=2)
    return sub, _groups(sub, _BLOCK // _SUB).sum(dim=2).double().cumsum(dim=1)


def inverse_cdf(
    q: torch.Tensor, u: torch.Tensor, levels: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """int64 [n, D]: token drawn for each uniform, P(token i) = q_i / sum(q).

    q: float [n, V] non-negative weights; u: float64 [n, D] in [0, 1); levels: q's
    `cdf_levels` if already computed. Three levels: a float64 CDF across blocks of 256
    tokens (tiny tail probabilities keep their share: a flat float32 cumsum over 150k
    tokens would round them away), then the block's 16 sub-block sums, then the
    sub-block's 16 tokens. A draw reads 32 weights, and draws go 64 at a time, so the
    working set is n * 64 * 16 whatever D. Zero-weight tokens are never drawn.
    """
    n = len(q)
    q = _blocked(q.float()).view(n, -1)
    sub, cdf = cdf_levels(q) if levels is None else levels
    total = cdf[:, -1:]
    last = torch.nextafter(total, torch.zeros_like(total))
    rows = torch.arange(n, device=q.device)[:, None]
    out = torch.empty(u.shape, dtype=torch.int64, device=q.device)
    for s in range(0, u.shape[1], _DRAW_SLICE):
        target = torch.minimum(u[:, s:s + _DRAW_SLICE] * total, last)
        b = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
        rest = target - torch.where(b > 0, cdf.gather(1, (b - 1).clamp_min(0)), 0.0)
        j, rest = _descend(_groups(sub, _BLOCK // _SUB), rows, b, rest)
        j = b * (_BLOCK // _SUB) + j
        i, _ = _descend(_groups(q, _SUB), rows, j, rest)
        out[:, s:s + _DRAW_SLICE] = j * _SUB + i
    return out


def _descend(
    groups: torch.Tensor, rows: torch.Tensor, g: torch.Tensor, rest: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One CDF level: inside group g [n, d] of `groups` [n, G, w], the member where the
    float64 offset `rest` [n, d] falls, and the offset left inside that member."""
    c = groups[rows, g].double().cumsum(dim=2)  # [n, d, w]
    j = torch.searchsorted(c, rest[..., None], right=True)[..., 0]
    # rounding can leave rest at or past the group's total: take its last member of
    # positive weight (the first to reach the total), never a zero-weight one
    j = torch.minimum(j, (c < c[..., -1:]).sum(dim=2))
    before = torch.where(j > 0, c.gather(2, (j - 1).clamp_min(0)[..., None])[..., 0], 0.0)
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

    drawn = inverse_cdf(q, u, levels)
    valid = torch.arange(dmax, device=q.device)[None, :] < draws[:, None]
    drawn = torch.where(valid, drawn, width)

    drawn, _ = drawn.sort(dim=1)
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
