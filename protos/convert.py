"""Conversions between wire messages and `logitcast.ops` values, shared by server and client.

The .proto is the contract; this module only moves values across it (spec
messages <-> `TargetSpec`, int32 row bytes <-> tensors) and validates sizes.
It knows nothing about serving, batching or caching.
"""

from __future__ import annotations

import numpy as np
import torch

from logitcast.ops.spec import TargetSpec
from logitcast.protos import teacher_pb2 as pb

#: Default gRPC message size limit, used by server and client alike.
MAX_MESSAGE_BYTES = 64 << 20

_SPEC_FIELDS = ("k", "p", "draws", "unique", "max_draws", "proposal_t", "k_head",
                "temperature", "seed")


def spec_to_proto(spec: TargetSpec) -> pb.TargetSpec:
    """Only the fields the method reads are set (the canonical form)."""
    d = spec.to_dict()
    msg = pb.TargetSpec(method=d.pop("method"))
    for name, value in d.items():
        if value is not None:
            setattr(msg, name, value)
    return msg


def spec_from_proto(msg: pb.TargetSpec) -> TargetSpec:
    """Raises `InvalidSpecError` for out-of-range or unread fields."""
    d: dict = {"method": msg.method or "sample"}
    for name in _SPEC_FIELDS:
        if msg.HasField(name):
            d[name] = getattr(msg, name)
    return TargetSpec.from_dict(d)


def rows_to_proto(tokens: torch.Tensor, document_ids: torch.Tensor | None = None) -> pb.Rows:
    """tokens: int [R, T] -> Rows with little-endian int32 bytes."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [rows, seq_len], got shape {tuple(tokens.shape)}")
    msg = pb.Rows(tokens=_int32_bytes(tokens), rows=tokens.shape[0], seq_len=tokens.shape[1])
    if document_ids is not None:
        if document_ids.shape != tokens.shape:
            raise ValueError("document_ids must have the shape of tokens")
        msg.document_ids = _int32_bytes(document_ids)
    return msg


def rows_from_proto(msg: pb.Rows) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens int64 [R, T], document ids int64 [R, T] or None); ValueError on size mismatch."""
    rows, seq = msg.rows, msg.seq_len
    if rows == 0 or seq == 0:
        raise ValueError(f"rows and seq_len must be > 0, got rows={rows} seq_len={seq}")
    tokens = _from_int32_bytes(msg.tokens, rows, seq, "rows.tokens")
    docs = _from_int32_bytes(msg.document_ids, rows, seq, "rows.document_ids") if msg.document_ids else None
    return tokens, docs


def _int32_bytes(t: torch.Tensor) -> bytes:
    return t.to(torch.int32).cpu().numpy().astype("<i4", copy=False).tobytes()


def _from_int32_bytes(data: bytes, rows: int, seq: int, field: str) -> torch.Tensor:
    want = rows * seq * 4
    if len(data) != want:
        raise ValueError(f"{field} has {len(data)} bytes, expected rows*seq_len*4 = {want}")
    arr = np.frombuffer(data, dtype="<i4").reshape(rows, seq)
    return torch.from_numpy(arr.astype(np.int64))
