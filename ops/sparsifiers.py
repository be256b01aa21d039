"""Sparsifiers: teacher logits -> `SparseTargets`, one chunk of positions at a time.

Methods (see `TargetSpec`):
- `full`      dense distribution (tests, tiny vocabularies);
- `topk`      top-k teacher probabilities, raw (biased once renormalised);
- `top_p_k`   top-p prefix, then capped at k (PD paper, section 3.2);
- `sample`    RS-KD: draws from q ~ p**t, weights p/q normalised (t = 1: counts / draws);
- `head_tail` exact top-k head + draws from the renormalised tail, tail weights
              scaled by the tail mass: unbiased with lower variance than `sample`.

All randomness comes from `rng.uniforms(seed, row key, position, draw)`, and every
step is a per-row operation with explicit tie-breaking (equal probabilities go to
the lower token id), so a position's targets are identical whatever batch or
chunk it is computed in. Peak extra memory is a few [chunk, V] tensors.

This module knows nothing about bytes (`codec`) or about where logits come from.
"""

from __future__ import annotations

import torch

from logitcast.ops.errors import InvalidSpecError, NonFiniteLogitsError
from logitcast.ops.rng import uniforms
from logitcast.ops.spec import TargetSpec
from logitcast.ops.targets import SparseTargets

#: Positions per chunk by default: peak extra memory ~ chunk * V * 40 bytes.
DEFAULT_CHUNK = 64
#: Largest vocabulary the ids (and the codec) support.
MAX_VOCAB = 1 << 24
_BLOCK = 256  # tokens per block of the two-level CDF
_TOP_EXACT = 64  # top tokens whose contribution to E[unique] is computed exactly


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


def _check_finite(x: torch.Tensor, offset: int) -> torch.Tensor:
    """float [n] row maxima, after checking every row has them finite."""
    top = x.amax(dim=1)  # NaN propagates; +inf shows; -inf means no finite logit
    if bool(torch.isfinite(top).all()):
        return top
    bad = torch.isnan(x) | torch.isposinf(x)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise NonFiniteLogitsError(
            f"logit at position {offset + row}, token {col} is {float(x[row, col])}"
        )
    row = int(torch.isneginf(top).nonzero()[0, 0])
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
    # the blocked sums and CDFs below are views, not copies of [n, V].
    if vocab % _BLOCK == 0 and logits.dtype == torch.float32 and logits.is_contiguous():
        x = logits
    else:
        x = logits.new_empty(n, -(-vocab // _BLOCK) * _BLOCK, dtype=torch.float32)
        x[:, :vocab] = logits
        x[:, vocab:] = float("-inf")
    x_max = _check_finite(x, offset)
    # softmax / log_softmax run one row at a time; an elementwise exp() over [n, V] would
    # not be batch-invariant on CPU (SIMD body vs scalar tail give different last bits).
    p1 = torch.softmax(x, dim=1)
    if with_entropy:
        logp1 = torch.log_softmax(x, dim=1)
        entropy = -row_sum((p1 * logp1).nan_to_num_(0.0))  # 0 * -inf counts as 0
        del logp1
    else:
        entropy = torch.full((n,), float("nan"), device=x.device)
    logprob = torch.full((n,), float("nan"), device=x.device)
    if labels is not None:  # log p(label) = x[label] - x_max + log p_max: no [n, V] log pass
        known = labels >= 0
        got = x.gather(1, labels.clamp_min(0).long()[:, None])[:, 0] - x_max
        logprob = torch.where(known, got + _log(p1.amax(dim=1)), logprob)
    scaled = x / spec.temperature if spec.temperature != 1.0 else x
    p = torch.softmax(scaled, dim=1) if spec.temperature != 1.0 else p1
    del p1

    zeros_n = torch.zeros(n, dtype=torch.int32, device=p.device)
    extras = {"entropy": entropy, "logprob": logprob, "vocab_size": vocab}
    if spec.method == "full":
        ids = torch.arange(vocab, device=p.device, dtype=torch.int32).expand(n, vocab).clone()
        full = torch.full((n,), vocab, dtype=torch.int32, device=p.device)
        return SparseTargets(ids=ids, weights=p[:, :vocab].contiguous(),
                             counts=torch.zeros_like(ids),
                             num_entries=full, num_head=full, draws=zeros_n,
                             tail_mass=torch.zeros(n, device=p.device), **extras)
    if spec.method in ("topk", "top_p_k"):
        ids = ordered_topk(x, spec.k)  # logits order = tempered probability order
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
        return SparseTargets(ids=ids, weights=w, counts=torch.zeros_like(ids), num_entries=num,
                             num_head=num, draws=zeros_n, tail_mass=tail, **extras)
    if spec.method == "sample":
        ones = torch.ones(n, dtype=torch.float64, device=p.device)
        q = p if spec.proposal_t == 1.0 else torch.softmax(scaled * spec.proposal_t, dim=1)
        ids, w, counts, num, draws = _sample(p, q, ones, spec, keys, pos)
        return SparseTargets(ids=ids, weights=w, counts=counts, num_entries=num,
                             num_head=zeros_n, draws=draws, tail_mass=ones.float(),
                             tail_from_counts=spec.proposal_t == 1.0, **extras)
    # head_tail
    head = ordered_topk(x, spec.k_head)
    head_w = p.gather(1, head)
    tail_p = p.scatter(1, head, 0.0)
    tail_mass = (1.0 - row_sum(head_w.double())).clamp_min(0.0)
    if spec.proposal_t == 1.0:
        q = tail_p
    else:
        q = torch.softmax(scaled.scatter(1, head, float("-inf")) * spec.proposal_t, dim=1)
    ids, w, counts, num, draws = _sample(tail_p, q, tail_mass, spec, keys, pos)
    k_head = torch.full((n,), spec.k_head, dtype=torch.int32, device=p.device)
    return SparseTargets(
        ids=torch.cat([head.to(torch.int32), ids], dim=1),
        weights=torch.cat([head_w, w], dim=1),
        counts=torch.cat([torch.zeros_like(head, dtype=torch.int32), counts], dim=1),
        num_entries=k_head + num, num_head=k_head, draws=draws,
        tail_mass=tail_mass.float(), tail_from_counts=spec.proposal_t == 1.0, **extras,
    )


# ---------------------------------------------------------------------------- pieces

def row_sum(x: torch.Tensor) -> torch.Tensor:
    """[n, V] -> [n] sums that do not depend on n (torch.sum splits long rows across
    threads differently for different batch sizes): sums of fixed 256-wide blocks,
    then a sequential cumsum over blocks."""
    return _blocked(x).sum(dim=2).cumsum(dim=1)[:, -1]


def row_sq_sum(x: torch.Tensor) -> torch.Tensor:
    """[n, V] -> [n] sums of squares, batch-invariant like `row_sum`, in one pass."""
    return (torch.linalg.vector_norm(_blocked(x), dim=2) ** 2).cumsum(dim=1)[:, -1]


def _blocked(x: torch.Tensor) -> torch.Tensor:
    """[n, V] -> [n, ceil(V / 256), 256], zero-padded; a view when V divides evenly."""
    n, width = x.shape
    nb = max(1, -(-width // _BLOCK))
    if nb * _BLOCK == width:
        return x.reshape(n, nb, _BLOCK)
    out = x.new_empty(n, nb * _BLOCK)
    out[:, :width] = x
    out[:, width:] = 0
    return out.view(n, nb, _BLOCK)


def ordered_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [n, k] ids of the k largest values per row, by descending value, ties to
    the lower id, so the choice is independent of the topk kernel, batch and device.

    Fast path: a plain topk(k + 1) settles every row whose k-th and (k+1)-th values
    differ; rows with a tie across that boundary are re-ranked on an exact int64 key
    (order-preserving float bits, then reversed id).
    """
    n, vocab = x.shape
    x = x.float()
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
    q: torch.Tensor, target: float, max_draws: int, total: torch.Tensor | None = None
) -> torch.Tensor:
    """int64 [n]: the draws D <= max_draws whose E[#distinct tokens] is closest to target.

    q: float [n, V] proposal, unnormalised is fine; total: its row sums if known
    (float64 [n]), else computed. E[unique](D) = sum_i 1 - (1 - q_i)^D, exact over the
    top tokens; the rest is treated as s1^2/s2 equal tokens that match its first two
    moments. D depends only on q, so the estimator stays unbiased.
    """
    q = q.float()
    total = (row_sum(q).double() if total is None else total.double()).clamp_min(1e-300)
    top = q.topk(min(_TOP_EXACT, q.shape[1]), dim=1).values.double() / total[:, None]
    s1 = (1.0 - row_sum(top)).clamp_min(0.0)
    sq = row_sq_sum(q).double() / (total * total)
    s2 = (sq - row_sum(top * top)).clamp_min(1e-300)
    log1m_top = torch.log1p(-top.clamp(max=1.0 - 1e-12))
    n_eff = s1 * s1 / s2
    log1m_eff = torch.log1p(-(s2 / s1.clamp_min(1e-300)).clamp(max=1.0 - 1e-12))

    def expected_unique(d: torch.Tensor) -> torch.Tensor:
        d = d.double()
        # exponents clamped at -60: (1 - q)^D below e^-60 is 0 here, and denormals are slow
        exact = row_sum(1.0 - torch.exp((log1m_top * d[:, None]).clamp_min(-60.0)))
        return exact + n_eff * (1.0 - torch.exp((log1m_eff * d).clamp_min(-60.0)))

    lo = torch.ones(q.shape[0], dtype=torch.int64, device=q.device)
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


def inverse_cdf(q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """int64 [n, D]: token drawn for each uniform, P(token i) = q_i / sum(q).

    q: float [n, V] non-negative weights; u: float64 [n, D] in [0, 1).
    Two-level CDF: float32 cumsums inside blocks of _BLOCK tokens, float64 across
    blocks, so tiny tail probabilities keep their share (a flat float32 cumsum over
    150k tokens would round them away). Zero-weight tokens are never drawn.
    """
    n = q.shape[0]
    local = _blocked(q.float()).cumsum(dim=2)
    nb = local.shape[1]
    block_cdf = local[:, :, -1].double().cumsum(dim=1)
    total = block_cdf[:, -1:]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    b = torch.searchsorted(block_cdf, target.contiguous(), right=True).clamp_(max=nb - 1)
    before = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp_min(0)), 0.0)
    rest = (target - before).float()
    rows = local[torch.arange(n, device=q.device)[:, None], b]  # [n, D, _BLOCK]
    j = torch.searchsorted(rows, rest[..., None], right=True)[..., 0]
    last_positive = (rows < rows[..., -1:]).sum(dim=2)  # first index holding the block total
    return b * _BLOCK + torch.minimum(j, last_positive)


def _sample(
    p: torch.Tensor,
    q: torch.Tensor,
    mass: torch.Tensor,
    spec: TargetSpec,
    keys: torch.Tensor,
    pos: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Draw from the proposal q (p itself when t = 1, else ~ p**t); importance weights
    p/q, normalised and scaled to `mass` (float64 [n]) per position.

    Returns ids int32 [n, K], weights float32 [n, K], counts int32 [n, K],
    num_entries int32 [n], draws int32 [n]. Positions with zero mass get no draws.
    """
    n, width = p.shape  # width: the padded vocabulary, also the "no draw" sentinel
    t = spec.proposal_t
    if spec.draws is not None:
        draws = torch.full((n,), spec.draws, dtype=torch.int64, device=p.device)
    else:
        total = mass if (t == 1.0 and q is p) else None
        draws = draws_for_unique(q, spec.unique, spec.max_draws, total)
    draws = torch.where(mass > 0, draws, 0)
    dmax = int(draws.max()) if n else 0
    u = uniforms(spec.seed, keys, pos, dmax)

    drawn = inverse_cdf(q, u)
    valid = torch.arange(dmax, device=p.device)[None, :] < draws[:, None]
    drawn = torch.where(valid, drawn, width)

    drawn, _ = drawn.sort(dim=1)
    valid = drawn < width
    first = torch.ones_like(valid)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    seg = first.long().cumsum(dim=1) - 1
    num = (first & valid).sum(dim=1, dtype=torch.int32)
    width = int(num.max()) if n else 0
    counts = torch.zeros(n, dmax, dtype=torch.int64, device=p.device)
    counts = counts.scatter_add_(1, seg, valid.long())[:, :width]
    ids = torch.zeros(n, dmax, dtype=torch.int64, device=p.device)
    ids = ids.scatter_(1, seg, torch.where(valid, drawn, 0))[:, :width]

    d = draws.clamp_min(1).double()[:, None]
    if t == 1.0:
        w = counts.double() / d
    else:
        ratio = p.gather(1, ids).double() / (q.gather(1, ids).double() / row_sum(q).double()[:, None])
        w = counts.double() * ratio.nan_to_num(0.0)
        w = w / row_sum(w).clamp_min(1e-300)[:, None]
    w = (w * mass[:, None]).float()
    return ids.to(torch.int32), w, counts.to(torch.int32), num, draws.to(torch.int32)
