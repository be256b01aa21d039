"""Teacher backends: a causal LM behind one small interface the server drives.

`TeacherBackend` runs the teacher over a batch of rows to the last hidden
state, then turns hidden states into float32 logits one chunk of positions at a
time, so [batch x vocab] logits never exist. `TransformersBackend` wraps any
Hugging Face causal LM (a local path, a hub id, the embedded SmolLM2 GGUF, or a
tiny random-init Llama for fast tests). This module does not know about
requests, batching policy, sparsifying or gRPC.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TeacherBackend(Protocol):
    """What the server needs from a teacher."""

    teacher_id: str
    tokenizer_fingerprint: str
    vocab_size: int
    max_seq_len: int
    device: torch.device
    supports_documents: bool

    def hidden_states(
        self, tokens: torch.Tensor, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens: int64 [B, T] on `device` -> last hidden state [B, T, d]."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, d] -> float32 logits [n, V] for one chunk of positions."""


def document_attention(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal causal attention for packed documents.

    document_ids: int64 [B, T], non-decreasing within a row.
    Returns (mask bool [B, 1, T, T], True = may attend; position_ids int64 [B, T]
    restarting at 0 at every document start).
    """
    b, t = document_ids.shape
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    idx = torch.arange(t, device=document_ids.device).expand(b, t)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.cummax(torch.where(starts, idx, 0), dim=1).values
    return (same_doc & causal)[:, None], idx - first


class TransformersBackend:
    """Any Hugging Face causal LM with a `.model` trunk and an `.lm_head`."""

    supports_documents = True

    def __init__(self, model: Any, *, teacher_id: str, tokenizer_fingerprint: str,
                 device: str | torch.device = "cpu") -> None:
        if not hasattr(model, "model") or not hasattr(model, "lm_head"):
            raise ValueError(f"{type(model).__name__} has no .model trunk and .lm_head")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.teacher_id = teacher_id
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.vocab_size = int(model.lm_head.out_features)
        self.max_seq_len = int(getattr(model.config, "max_position_embeddings", 2048))

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: str = "bf16",
                        device: str = "cpu") -> TransformersBackend:
        """A local path or hub id; `default` means the embedded SmolLM2-135M teacher."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if name_or_path == "default":
            from logitcast.server.embedded import (
                EMBEDDED_TEACHER_ID,
                load_embedded_teacher,
                tokenizer_fingerprint,
            )

            model, tok = load_embedded_teacher(dtype=DTYPES[dtype])
            return cls(model, teacher_id=EMBEDDED_TEACHER_ID,
                       tokenizer_fingerprint=tokenizer_fingerprint(tok), device=device)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from logitcast.server.embedded import tokenizer_fingerprint

        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype],
                                                     attn_implementation="sdpa")
        tok = AutoTokenizer.from_pretrained(name_or_path)
        return cls(model, teacher_id=str(name_or_path),
                   tokenizer_fingerprint=tokenizer_fingerprint(tok), device=device)

    @classmethod
    def tiny_random(cls, *, vocab_size: int = 1024, seed: int = 0, hidden: int = 64,
                    layers: int = 2, max_seq_len: int = 1024,
                    device: str = "cpu") -> TransformersBackend:
        """A seeded random-init Llama: the real code path at test speed."""
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden,
                             intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=max_seq_len, attn_implementation="sdpa")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        tid = f"tiny-random-v{vocab_size}-d{hidden}-l{layers}-s{seed}"
        fp = hashlib.blake2b(f"tiny-tokenizer-{vocab_size}".encode(), digest_size=16).hexdigest()
        return cls(model, teacher_id=tid, tokenizer_fingerprint=fp, device=device)

    @torch.inference_mode()
    def hidden_states(self, tokens: torch.Tensor,
                      document_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if document_ids is not None:
            mask, positions = document_attention(document_ids)
            kwargs = {"attention_mask": mask, "position_ids": positions}
        return self.model.model(input_ids=tokens, use_cache=False, **kwargs).last_hidden_state

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()
