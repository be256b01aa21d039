"""Per-request limits and message sizes, shared by the servicer and the gRPC options.

Limits here are about one request (INVALID_ARGUMENT when exceeded); capacity of
the whole server (queue) lives in `EngineConfig` (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

from dataclasses import dataclass

from logitcast.ops.spec import TargetSpec
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

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_tokens", "max_seq_len", "chunk_positions"):
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
