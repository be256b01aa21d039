"""Row identity: the one key of a unit of taught tokens, and the coordinates of its draws.

A *unit* is what one cache record holds: a whole packed row, or in document
mode one document segment of a row. Its `row_key` is blake2b-128 of its tokens
as little-endian int32 — content only, so the same tokens get the same key in
any batch, rank, step or process. The random draws of position t of a unit are
keyed by (`draw_key(row_key)`, t): the first 8 bytes of that same digest as an
int64, and t counted from the unit's start. The server computes all of it from
the tokens it received (clients never choose draw coordinates); the cache, the
client's echo check, the offline reader and the benchmarks call the same
functions, so there is exactly one value per unit everywhere.

This module knows nothing about caches, wire formats or sampling.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

#: Bytes of a row key (blake2b digest size).
KEY_BYTES = 16
#: Bumped whenever the key or draw-coordinate derivation changes: part of every cache
#: namespace, so targets drawn under another derivation are never mixed in.
ROW_KEY_VERSION = 2


def row_key(tokens: torch.Tensor | np.ndarray) -> bytes:
    """16-byte key of a unit (a row or a document segment): blake2b-128 of its int32
    little-endian tokens. tokens: int [T] (any int dtype, any device)."""
    arr = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    return hashlib.blake2b(arr.astype("<i4").tobytes(), digest_size=KEY_BYTES).digest()


def draw_key(key: bytes) -> int:
    """The int64 that keys a unit's random draws: the first 8 bytes of its row key."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a row key has {KEY_BYTES} bytes, got {len(key)}")
    return int.from_bytes(key[:8], "little", signed=True)


def segments(document_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every run of equal document ids, row by row.

    document_ids: int [B, T], non-decreasing within a row.
    """
    b, t = document_ids.shape
    change = torch.ones(b, t, dtype=torch.bool)
    change[:, 1:] = document_ids[:, 1:].cpu() != document_ids[:, :-1].cpu()
    out = []
    for row, starts in enumerate(change.numpy()):
        edges = [*starts.nonzero()[0].tolist(), t]
        out.extend((row, s, e) for s, e in zip(edges[:-1], edges[1:]))
    return out


def units(tokens: torch.Tensor, document_ids: torch.Tensor | None = None
          ) -> list[tuple[int, int, int]]:
    """(row, start, end) of every unit of int [B, T] rows: whole rows, or document segments."""
    if document_ids is None:
        return [(r, 0, tokens.shape[1]) for r in range(tokens.shape[0])]
    return segments(document_ids)


def draw_coordinates(tokens: torch.Tensor, document_ids: torch.Tensor | None = None
                     ) -> tuple[list[bytes], torch.Tensor, torch.Tensor]:
    """Keys of every unit of `tokens` and the draw coordinates of every position.

    tokens: int [B, T]; document_ids: int [B, T] or None.
    Returns (row keys of `units(tokens, document_ids)` in order, draw keys int64 [B*T],
    positions int64 [B*T] counted from each unit's start), on CPU.
    """
    b, t = tokens.shape
    host = tokens.cpu()
    spans = units(host, document_ids)
    keys = [row_key(host[r, s:e]) for r, s, e in spans]
    draw = torch.empty(b, t, dtype=torch.int64)
    pos = torch.empty(b, t, dtype=torch.int64)
    for (r, s, e), key in zip(spans, keys):
        draw[r, s:e] = draw_key(key)
        pos[r, s:e] = torch.arange(e - s)
    return keys, draw.reshape(-1), pos.reshape(-1)


def next_token_labels(tokens: torch.Tensor, document_ids: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """int64 [B, T]: the true next token of every position as a teacher sees it from the
    tokens alone (the log-prob extra's label): the next token of the row, -1 at a row's
    last position and before another document's first token.

    tokens: int [B, T]; document_ids: int [B, T] or None. Same device as `tokens`.
    """
    labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], dim=1).long()
    if document_ids is not None:
        labels[:, :-1][document_ids[:, 1:] != document_ids[:, :-1]] = -1
    return labels
