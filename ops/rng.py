"""Counter-based randomness: uniforms as a pure function of where they are used.

`uniforms(seed, row_keys, positions, n)` returns, for every position, `n`
floats in [0, 1) that depend only on (seed, stream, row key, position, draw
index). No generator state, no dependence on batch composition, chunking,
call order or device: the same row gets the same draws alone or inside any
batch, on a teacher replica or in a cache re-derivation.

The hash is SplitMix64's finaliser, written with int64 torch ops (wrapping
multiply, logical shifts by masking), so it runs unchanged on CPU and CUDA.
This module deliberately knows nothing about distributions or sampling.
"""

from __future__ import annotations

import torch

# SplitMix64 constants as signed int64 (two's complement of the usual uint64 values).
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MUL1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MUL2 = -7723592293110705685  # 0x94D049BB133111EB
_MASK53 = (1 << 53) - 1

# Independent streams for independent uses of the same (row, position).
STREAM_SAMPLE = 1
STREAM_THIN = 2


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _signed64(x: int) -> int:
    """Python int reduced modulo 2**64 into int64's two's-complement range."""
    return ((x & (2**64 - 1)) ^ (1 << 63)) - (1 << 63)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors: a bijective, well-mixed hash."""
    x = (x ^ _shr(x, 30)) * _MUL1
    x = (x ^ _shr(x, 27)) * _MUL2
    return x ^ _shr(x, 31)


def uniforms(
    seed: int,
    row_keys: torch.Tensor,
    positions: torch.Tensor,
    n: int,
    *,
    stream: int = STREAM_SAMPLE,
) -> torch.Tensor:
    """Counter-based uniforms.

    seed: any Python int (reduced to 64 bits).
    row_keys: int64 [N], one per position (the row's content key).
    positions: int64 [N], the position inside its row.
    n: draws per position.
    Returns float64 [N, n] in [0, 1) with 53 random bits each, on row_keys' device.
    """
    if row_keys.shape != positions.shape or row_keys.dim() != 1:
        raise ValueError(
            f"row_keys and positions must be 1-D of equal length, got "
            f"{tuple(row_keys.shape)} and {tuple(positions.shape)}"
        )
    start = _signed64(seed + stream * _GOLDEN)
    device = row_keys.device
    base = mix64(torch.full_like(row_keys, start, dtype=torch.int64))
    base = mix64(base ^ row_keys.to(torch.int64))
    base = mix64(base ^ (positions.to(device=device, dtype=torch.int64) + 1))
    draw = torch.arange(1, n + 1, device=device, dtype=torch.int64) * _GOLDEN
    bits = mix64(base[:, None] + draw[None, :])
    return (_shr(bits, 11) & _MASK53).to(torch.float64) * (1.0 / (1 << 53))
