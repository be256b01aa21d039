"""Per-request limits, message sizes and cost estimates, shared by the servicer and the engine.

Limits here are about one request (INVALID_ARGUMENT when exceeded, before any
compute); capacity of the whole server (queue, memory budget) lives in
`EngineConfig` (RESOURCE_EXHAUSTED). The cost estimates are upper bounds: what a
job may produce (`bytes_per_position`) and what sparsifying one chunk of its
positions may hold at once (`working_set_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from logitcast.ops.errors import InvalidSpecError
from logitcast.ops.spec import MAX_DRAWS_7BIT, TargetSpec
from logitcast.protos.convert import MAX_MESSAGE_BYTES

_HEADER_SLACK = 1 << 16


@dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """What one request may ask for."""

    max_rows: int = 1024
    """Rows per request."""
    max_tokens: int = 131072
    """rows x seq_len per request."""
    max_seq_len: int = 8192
    """Longest row (also capped by the teacher's context)."""
    chunk_positions: int = 2048
    """Default positions per streamed chunk (rows_per_chunk = this // seq_len)."""
    max_message_bytes: int = MAX_MESSAGE_BYTES
    """gRPC message limit, both directions."""
    max_draws: int = MAX_DRAWS_7BIT
    """Largest `draws` / `max_draws` a sampled spec may ask for (the sampler's working
    set and the output grow with it)."""
    allow_full: bool = False
    """Serve `full` (dense) targets at all: off by default, they are V entries per position."""
    max_full_vocab: int = 8192
    """`full` is refused for teachers with a larger vocabulary even when allowed."""

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_tokens", "max_seq_len", "chunk_positions", "max_draws",
                     "max_full_vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_message_bytes < 1 << 20:
            raise ValueError(f"max_message_bytes must be >= 1 MiB, got {self.max_message_bytes}")
        if self.max_tokens * 8 + _HEADER_SLACK > self.max_message_bytes:
            raise ValueError(f"max_tokens={self.max_tokens} int32 tokens + document ids do not fit "
                             f"max_message_bytes={self.max_message_bytes}")

    @property
    def max_chunk_bytes(self) -> int:
        """Largest codec payload one DistillChunk may carry."""
        return self.max_message_bytes - _HEADER_SLACK

    def check_spec(self, spec: TargetSpec, vocab_size: int) -> None:
        """InvalidSpecError naming the field when `spec` is over this server's limits."""
        if spec.method == "full":
            if not self.allow_full:
                raise InvalidSpecError("spec.method 'full' is disabled on this server "
                                       "(dense targets; start it with --allow-full)")
            if vocab_size > self.max_full_vocab:
                raise InvalidSpecError(f"spec.method 'full' needs vocab <= max_full_vocab="
                                       f"{self.max_full_vocab}; this teacher has {vocab_size}")
        if spec.sampled and spec.draw_cap > self.max_draws:
            field = "draws" if spec.draws is not None else "max_draws"
            raise InvalidSpecError(f"spec.{field}={spec.draw_cap} exceeds this server's "
                                   f"max_draws={self.max_draws}")


def bytes_per_position(spec: TargetSpec, vocab_size: int) -> int:
    """Upper bound on encoded bytes per position for `spec` (entries are <= 8 bytes)."""
    if spec.method == "full":
        entries = vocab_size
    elif spec.method in ("topk", "top_p_k"):
        entries = spec.k
    elif spec.method == "sample":
        entries = spec.draw_cap
    else:
        entries = spec.k_head + spec.draw_cap
    return 8 * min(entries, vocab_size) + 16


def working_set_bytes(spec: TargetSpec, vocab_size: int, positions: int) -> int:
    """Upper bound on the bytes sparsifying `positions` positions holds at once: a few
    float32 [positions, V] tensors (logits, probabilities, the tail or proposal), the
    sampler's blocks of 256 tokens per draw (in slices of at most 64 draws), and the
    entries; `full` also holds its dense output and the ids that index it."""
    per_position = 3 * 4 * vocab_size + 8 * bytes_per_position(spec, vocab_size)
    if spec.sampled:
        per_position += 4 * 256 * min(spec.draw_cap, 64)
    if spec.method == "full":
        per_position += 8 * vocab_size
    return positions * per_position
