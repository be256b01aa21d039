"""Packed-aligned batches: the exact rows a student trains on, rebuildable anywhere.

Row mode: documents, shuffled per epoch with a seeded permutation, are
concatenated with EOS into one stream; global row g holds stream[g*T : g*T + T]
and its labels are the next tokens stream[g*T + 1 : g*T + T + 1] (so every
token is a label exactly once). Document mode: documents are split at fixed
offsets of `max_document_tokens`, the pieces shuffled and packed greedily into
rows, padded at the end; attention stays inside a piece, so a piece's teacher
targets do not depend on the packing, seq_len, batch or world size.

Step s, rank k of world w gets global rows [s*G + k*G/w, s*G + (k+1)*G/w): a
pure function of (corpus, seed, seq_len, G, s, k, w), so a resumed run, a
teacher and any other process rebuild the same rows. This module knows nothing
about teachers, targets or devices.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from logitcast.data.shards import TokenCorpus
from logitcast.ops.rowkey import row_key

IGNORE = -100


@dataclass(frozen=True, kw_only=True)
class PackingConfig:
    """How a corpus becomes rows."""

    seq_len: int = 512
    """Tokens per row."""
    global_batch: int = 8
    """Rows per optimizer step across all ranks (divisible by the world size)."""
    seed: int = 0
    """Shuffle seed; epoch e uses (seed, e)."""
    mode: str = "rows"
    """'rows' (causal attention across documents) or 'documents' (attention per document)."""
    max_document_tokens: int = 512
    """Document mode: pieces of at most this many tokens, cut at fixed offsets (<= seq_len)."""

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.global_batch < 1:
            raise ValueError(f"seq_len must be >= 2 and global_batch >= 1, got {self.seq_len}, "
                             f"{self.global_batch}")
        if self.mode not in ("rows", "documents"):
            raise ValueError(f"mode must be 'rows' or 'documents', got {self.mode!r}")
        if self.mode == "documents" and not 1 <= self.max_document_tokens <= self.seq_len:
            raise ValueError(f"max_document_tokens must be in [1, seq_len={self.seq_len}], "
                             f"got {self.max_document_tokens}")


@dataclass(frozen=True)
class PackedBatch:
    """One rank's rows for one step."""

    step: int
    input_ids: torch.Tensor
    """int64 [B, T]"""
    labels: torch.Tensor
    """int64 [B, T], IGNORE on padding"""
    document_ids: torch.Tensor | None
    """int64 [B, T] (document mode) or None"""
    row_keys: tuple[bytes, ...]
    """`ops.rowkey.row_key` of each row's input_ids: what the server echoes per row"""


class Packer:
    """Rows of a `TokenCorpus` for any (step, rank, world)."""

    def __init__(self, corpus: TokenCorpus, config: PackingConfig) -> None:
        if corpus.num_documents == 0:
            raise ValueError(f"corpus {corpus.directory} has no documents")
        self.corpus, self.config = corpus, config
        if config.mode == "rows":
            self.rows_per_epoch = (corpus.num_tokens + corpus.num_documents - 1) // config.seq_len
        else:
            self.rows_per_epoch = len(self._doc_epoch(0)[2]) - 1
        if self.rows_per_epoch < 1:
            raise ValueError(f"corpus too small for one row of {config.seq_len} tokens")

    def batch(self, step: int, rank: int = 0, world: int = 1) -> PackedBatch:
        g = self.config.global_batch
        if world < 1 or g % world or not 0 <= rank < world or step < 0:
            raise ValueError(f"global_batch {g} must split over world {world}; rank {rank}, "
                             f"step {step}")
        per = g // world
        rows = [self.row(step * g + rank * per + i) for i in range(per)]
        ids = torch.stack([r[0] for r in rows])
        labels = torch.stack([r[1] for r in rows])
        docs = torch.stack([r[2] for r in rows]) if self.config.mode == "documents" else None
        return PackedBatch(step, ids, labels, docs, tuple(row_key(r) for r in ids))

    def row(self, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(input_ids, labels, document_ids or None) of global row g."""
        epoch, local = divmod(g, self.rows_per_epoch)
        if self.config.mode == "rows":
            return self._stream_row(epoch, local)
        return self._document_row(epoch, local)

    # ------------------------------------------------------------------ row mode

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one packer per run; bounded)
    def _stream_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng([self.config.seed, epoch]).permutation(
            self.corpus.num_documents)
        ends = np.cumsum(self.corpus.lengths[order] + 1)  # + EOS
        return order, ends

    def _stream_row(self, epoch: int, local: int):
        t = self.config.seq_len
        order, ends = self._stream_epoch(epoch)
        start, stop = local * t, local * t + t + 1
        first = int(np.searchsorted(ends, start, side="right"))
        out, pos, i = [], start, first
        while pos < stop and i < len(order):
            begin = ends[i] - self.corpus.lengths[order[i]] - 1
            doc = np.append(self.corpus.document(int(order[i])), self.corpus.eos_id)
            piece = doc[pos - begin: stop - begin]
            out.append(piece)
            pos += len(piece)
            i += 1
        stream = torch.from_numpy(np.concatenate(out))  # t + 1 tokens: rows_per_epoch fits
        return stream[:t], stream[1:], None

    # ------------------------------------------------------------------ document mode

    @functools.lru_cache(maxsize=2)  # noqa: B019
    def _doc_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(piece doc index, piece start within doc, first piece of each row + end)."""
        p, t = self.config.max_document_tokens, self.config.seq_len
        lengths = self.corpus.lengths
        counts = (lengths + p - 1) // p
        doc = np.repeat(np.arange(len(lengths)), counts)
        start = (np.arange(len(doc)) - np.repeat(np.cumsum(counts) - counts, counts)) * p
        order = np.random.default_rng([self.config.seed, epoch, 1]).permutation(len(doc))
        doc, start = doc[order], start[order]
        size = np.minimum(lengths[doc] - start, p)
        row_first, used = [0], 0
        for i, n in enumerate(size):  # greedy packing, once per epoch
            if used + n > t:
                row_first.append(i)
                used = 0
            used += n
        row_first.append(len(size))
        return doc, start, np.asarray(row_first)

    def _document_row(self, epoch: int, local: int):
        t, p = self.config.seq_len, self.config.max_document_tokens
        doc, start, row_first = self._doc_epoch(epoch)
        ids = torch.full((t,), self.corpus.eos_id, dtype=torch.int64)
        labels = torch.full((t,), IGNORE, dtype=torch.int64)
        docs = torch.empty(t, dtype=torch.int64)
        pos = 0
        for j, i in enumerate(range(row_first[local], row_first[local + 1])):
            full = self.corpus.document(int(doc[i]))
            piece = full[start[i]:start[i] + p]
            after = np.append(full, self.corpus.eos_id)[start[i] + 1:start[i] + len(piece) + 1]
            ids[pos:pos + len(piece)] = torch.from_numpy(piece)
            labels[pos:pos + len(piece)] = torch.from_numpy(after)
            docs[pos:pos + len(piece)] = j
            pos += len(piece)
        docs[pos:] = row_first[local + 1] - row_first[local]  # padding: one trailing segment
        return ids, labels, docs
