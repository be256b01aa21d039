"""`SparseTargets`: fixed-width sparse teacher distributions for N positions.

Row n holds `num_entries[n]` entries: the first `num_head[n]` carry exact
teacher probabilities (top-k style, by descending probability; vocabulary
order for `full`), the rest are sampled tokens whose weights are unbiased
estimates built from `counts` draws out of `draws[n]`. Columns past
`num_entries[n]` are padding: id 0, weight 0, count 0. Weights of a row sum
to 1 for `full`, `sample` and `head_tail`, and to 1 - tail_mass for `topk`
and `top_p_k` (the raw, un-renormalised teacher probabilities).

This module is a container plus shape helpers; it does not know how targets
are made (`sparsify`) or stored (`codec`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseTargets:
    """Sparse targets for N positions, padded to K entries."""

    ids: torch.Tensor
    """int32 [N, K] token ids."""
    weights: torch.Tensor
    """float32 [N, K] target probabilities (padding 0)."""
    counts: torch.Tensor
    """int32 [N, K] draws that landed on each sampled entry (0 for exact entries and padding)."""
    num_entries: torch.Tensor
    """int32 [N] valid entries per position."""
    num_head: torch.Tensor
    """int32 [N] leading entries that are exact teacher probabilities."""
    draws: torch.Tensor
    """int32 [N] draws behind the sampled entries (0 when none)."""
    tail_mass: torch.Tensor
    """float32 [N] teacher mass outside the exact head entries (1 for `sample`, 0 for `full`)."""
    entropy: torch.Tensor
    """float32 [N] teacher entropy in nats at temperature 1."""
    logprob: torch.Tensor
    """float32 [N] teacher log-prob of the true next token at temperature 1 (NaN if unknown)."""
    vocab_size: int
    """Size of the teacher vocabulary the ids index."""
    tail_from_counts: bool = True
    """True when sampled weights are exactly tail_mass * counts / draws (proposal t = 1)."""

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def width(self) -> int:
        """K, the padded number of entries per position."""
        return self.ids.shape[1]

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> SparseTargets:
        """Same targets on another device."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    def pad_to(self, k: int) -> SparseTargets:
        """Pad (or trim padding) to exactly k entries per position."""
        need = int(self.num_entries.max()) if len(self) else 0
        if k < need:
            raise ValueError(f"cannot pad to k={k}: a position has {need} entries")
        cur = self.width
        if k <= cur:
            return dataclasses.replace(
                self, ids=self.ids[:, :k], weights=self.weights[:, :k], counts=self.counts[:, :k]
            )
        extra = k - cur
        n = len(self)

        def grow(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(n, extra)], dim=1)

        return dataclasses.replace(
            self, ids=grow(self.ids), weights=grow(self.weights), counts=grow(self.counts)
        )

    def to_dense(self) -> torch.Tensor:
        """float32 [N, V] target distribution. For tests and tiny vocabularies only."""
        dense = torch.zeros(len(self), self.vocab_size, dtype=torch.float32, device=self.device)
        return dense.scatter_add_(1, self.ids.long(), self.weights.float())

    @staticmethod
    def empty(n: int, vocab_size: int, *, tail_from_counts: bool = True) -> SparseTargets:
        """n positions without targets (e.g. padding): no entries, NaN extras."""
        zi = torch.zeros(n, 0, dtype=torch.int32)
        zn = torch.zeros(n, dtype=torch.int32)
        nan = torch.full((n,), float("nan"))
        return SparseTargets(ids=zi, weights=zi.float(), counts=zi, num_entries=zn, num_head=zn,
                             draws=zn, tail_mass=torch.ones(n), entropy=nan, logprob=nan,
                             vocab_size=vocab_size, tail_from_counts=tail_from_counts)

    def same_entries(self, other: SparseTargets) -> torch.Tensor:
        """bool [N]: position n holds the same ids with the same draw counts in both, in
        any order (e.g. two backends' draws for the same rows agree there)."""
        if len(self) != len(other):
            raise ValueError(f"{len(self)} positions vs {len(other)}")
        width, pad = max(self.width, other.width), 1 << 62  # above any id; exact as a float

        def canonical(t: SparseTargets) -> tuple[torch.Tensor, torch.Tensor]:
            valid = torch.arange(t.width, device=t.ids.device) < t.num_entries[:, None]
            ids = torch.nn.functional.pad(torch.where(valid, t.ids.long(), pad),
                                          (0, width - t.width), value=pad)
            counts = torch.nn.functional.pad(torch.where(valid, t.counts, 0),
                                             (0, width - t.width))
            ids, order = ids.sort(dim=1)  # padding sorts last
            return ids, counts.gather(1, order)

        (ia, ca), (ib, cb) = canonical(self), canonical(other)
        return ((self.num_entries == other.num_entries) & (ia == ib).all(dim=1)
                & (ca == cb).all(dim=1))

    @staticmethod
    def cat(parts: list[SparseTargets]) -> SparseTargets:
        """Concatenate along positions, padding to the widest part."""
        if not parts:
            raise ValueError("cannot concatenate an empty list of SparseTargets")
        vocab = {p.vocab_size for p in parts}
        modes = {p.tail_from_counts for p in parts}
        if len(vocab) != 1 or len(modes) != 1:
            raise ValueError(f"parts disagree on vocab_size {vocab} or tail_from_counts {modes}")
        k = max(p.width for p in parts)
        parts = [p.pad_to(k) for p in parts]
        tensors = {
            f.name: torch.cat([getattr(p, f.name) for p in parts])
            for f in dataclasses.fields(SparseTargets)
            if isinstance(getattr(parts[0], f.name), torch.Tensor)
        }
        return SparseTargets(**tensors, vocab_size=vocab.pop(), tail_from_counts=modes.pop())

    def __getitem__(self, sl: slice) -> SparseTargets:
        """Positions `sl` (a slice), keeping the width."""
        if not isinstance(sl, slice):
            raise TypeError("SparseTargets supports slicing by positions only")
        tensors = {
            f.name: getattr(self, f.name)[sl]
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **tensors)
