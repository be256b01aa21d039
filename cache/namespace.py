"""Cache namespaces and record keys.

A namespace is everything that makes two targets for the same row comparable:
teacher, tokenizer, target spec, codec version and attention mode. Each has its
own directory (named by a hash of those fields) with a manifest recording them.
A record key is `logitcast.ops.rowkey.row_key` of what was taught: a row's
tokens, or in document mode one document piece's tokens; the row-key version is
part of the namespace, so targets drawn under another key derivation never mix.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass

from logitcast.ops.codec import VERSION
from logitcast.ops.rowkey import KEY_BYTES, ROW_KEY_VERSION, row_key
from logitcast.ops.spec import TargetSpec

__all__ = ["KEY_BYTES", "CacheNamespace", "row_key"]


@dataclass(frozen=True, kw_only=True)
class CacheNamespace:
    """What the targets in one cache directory were made with."""

    teacher_id: str
    tokenizer_fingerprint: str
    spec: TargetSpec
    codec_version: int = VERSION
    document_mode: bool = False
    row_key_version: int = ROW_KEY_VERSION

    def to_dict(self) -> dict:
        return {"teacher_id": self.teacher_id, "tokenizer_fingerprint": self.tokenizer_fingerprint,
                "spec": self.spec.to_dict(), "codec_version": self.codec_version,
                "document_mode": self.document_mode,
                "row_key_version": self.row_key_version}

    @classmethod
    def from_dict(cls, d: dict) -> CacheNamespace:
        try:
            return cls(teacher_id=d["teacher_id"], tokenizer_fingerprint=d["tokenizer_fingerprint"],
                       spec=TargetSpec.from_dict(d["spec"]), codec_version=int(d["codec_version"]),
                       document_mode=bool(d["document_mode"]),
                       row_key_version=int(d.get("row_key_version", 1)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad cache namespace manifest: {exc}") from exc

    @functools.cached_property
    def name(self) -> str:
        """Directory name: a stable hash of the fields."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.blake2b(blob, digest_size=12).hexdigest()

