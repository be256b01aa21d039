"""Cache namespaces and record keys.

A namespace is everything that makes two targets for the same row comparable:
teacher, tokenizer, target spec, codec version and attention mode. Each has its
own directory (named by a hash of those fields) with a manifest recording them.
A record key is the content of what was taught: a row's tokens, or in document
mode one document piece's tokens.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from logitcast.ops.codec import VERSION
from logitcast.ops.spec import TargetSpec

KEY_BYTES = 16


@dataclass(frozen=True, kw_only=True)
class CacheNamespace:
    """What the targets in one cache directory were made with."""

    teacher_id: str
    tokenizer_fingerprint: str
    spec: TargetSpec
    codec_version: int = VERSION
    document_mode: bool = False

    def to_dict(self) -> dict:
        return {"teacher_id": self.teacher_id, "tokenizer_fingerprint": self.tokenizer_fingerprint,
                "spec": self.spec.to_dict(), "codec_version": self.codec_version,
                "document_mode": self.document_mode}

    @classmethod
    def from_dict(cls, d: dict) -> CacheNamespace:
        try:
            return cls(teacher_id=d["teacher_id"], tokenizer_fingerprint=d["tokenizer_fingerprint"],
                       spec=TargetSpec.from_dict(d["spec"]), codec_version=int(d["codec_version"]),
                       document_mode=bool(d["document_mode"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad cache namespace manifest: {exc}") from exc

    @functools.cached_property
    def name(self) -> str:
        """Directory name: a stable hash of the fields."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.blake2b(blob, digest_size=12).hexdigest()


def row_key(tokens: torch.Tensor | np.ndarray) -> bytes:
    """16-byte key of a row (or document piece): blake2b of its int32 little-endian tokens."""
    arr = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    return hashlib.blake2b(arr.astype("<i4").tobytes(), digest_size=KEY_BYTES).digest()
