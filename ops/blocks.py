"""Batch-invariant row reductions: sums, sums of squares and top-k over fixed blocks of
256 tokens, giving the same bits for a row alone or inside any batch.

torch.sum splits a long row across threads differently for different batch sizes, and
torch.topk breaks ties however its kernel likes. Here sums go block by block (fixed
256-wide blocks, then a sequential cumsum over blocks), and top-k orders by value with
ties to the lower id; a long row's top-k is searched only in the k blocks with the
largest maxima, so once those maxima are known (one read of the row, which a caller
may have made already) it costs k blocks, not the row.

This module knows nothing about probabilities, sampling or targets.
"""

from __future__ import annotations

import torch

#: Tokens per block; V is padded to a multiple of it where blocks must be views.
BLOCK = 256


def row_sum(x: torch.Tensor) -> torch.Tensor:
    """[n, V] -> [n] sums that do not depend on n (torch.sum splits long rows across
    threads differently for different batch sizes): sums of fixed 256-wide blocks,
    then a sequential cumsum over blocks."""
    return blocked(x).sum(dim=2).cumsum(dim=1)[:, -1]


def short_row_sum(x: torch.Tensor) -> torch.Tensor:
    """[n, K] -> [n] for short rows (K of a few dozen): a sequential cumsum, as
    batch-invariant as `row_sum` without padding K to a 256-wide block."""
    return x.cumsum(dim=1)[:, -1] if x.shape[1] else x.new_zeros(x.shape[0])


def row_sq_sum(x: torch.Tensor) -> torch.Tensor:
    """[n, V] -> [n] sums of squares, batch-invariant like `row_sum`, in one pass."""
    return (torch.linalg.vector_norm(blocked(x), dim=2) ** 2).cumsum(dim=1)[:, -1]


def blocked(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """[n, V] -> [n, ceil(V / 256), 256], padded with `fill`; a view when V divides evenly."""
    n, width = x.shape
    nb = max(1, -(-width // BLOCK))
    if nb * BLOCK == width:
        return x.reshape(n, nb, BLOCK)
    out = x.new_empty(n, nb * BLOCK)
    out[:, :width] = x
    out[:, width:] = fill
    return out.view(n, nb, BLOCK)


def groups(x: torch.Tensor, w: int) -> torch.Tensor:
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
    if k == 0:
        return torch.zeros(n, 0, dtype=torch.int64, device=x.device)
    if 2 * k > -(-vocab // BLOCK):
        return _ordered_topk_rows(x, k)
    tiles = blocked(x, float("-inf"))
    if block_max is None:
        block_max = tiles.amax(dim=2)
    # ascending block ids, so a candidate's column order is its token id order
    blocks = ordered_topk(block_max, k).sort(dim=1).values
    rows = torch.arange(n, device=x.device)[:, None]
    local = _ordered_topk_rows(tiles[rows, blocks].reshape(n, k * BLOCK), k)
    return blocks.gather(1, local // BLOCK) * BLOCK + local % BLOCK


def _ordered_topk_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """`ordered_topk` over whole rows. A plain topk(k + 1) settles every row whose k-th
    and (k+1)-th values differ; in a row with a tie across that boundary, the tokens tied
    at the k-th value fill the remaining places lowest id first."""
    vocab = x.shape[1]
    vals, ids = x.topk(min(k + 1, vocab), dim=1, sorted=True)
    if k < vocab:
        boundary_tie = vals[:, k - 1] == vals[:, k]
        vals, ids = vals[:, :k], ids[:, :k]
        if bool(boundary_tie.any()):
            rows = boundary_tie.nonzero()[:, 0]
            ids = ids.clone()
            ids[rows] = _lowest_ids_topk(x[rows], vals[rows, k - 1:], k)
            vals = x.gather(1, ids)
    ids, order = ids.sort(dim=1)
    vals = vals.gather(1, order)
    order = vals.sort(dim=1, descending=True, stable=True).indices
    return ids.gather(1, order)


def _lowest_ids_topk(x: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [r, k]: every id whose value is above the row's k-th largest value kth
    [r, 1], then the lowest ids among those equal to it (keyed by -id: float32 holds
    every id below 2**24 exactly)."""
    neg_id = -torch.arange(x.shape[1], device=x.device, dtype=torch.float32)
    key = torch.where(x > kth, float("inf"), torch.where(x == kth, neg_id, float("-inf")))
    return key.topk(k, dim=1).indices


def top_ids(x: torch.Tensor, block_max: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [n, k] ids of each row's k largest values, by descending value; ties in any
    order, so only for uses that need the values. x: [n, V] with V a multiple of 256."""
    n = len(x)
    blocks = block_max.topk(min(k, block_max.shape[1]), dim=1).indices
    cand = groups(x, BLOCK)[torch.arange(n, device=x.device)[:, None], blocks]
    local = cand.flatten(1).topk(k, dim=1).indices
    return blocks.gather(1, local // BLOCK) * BLOCK + local % BLOCK
