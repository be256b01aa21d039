"""Student models: Llama-style HF causal LMs from a preset, or any local HF model.

Presets are the student sizes of the PD paper's Table 7 (hidden, FFN, layers,
heads, query groups, tied embeddings) plus tiny ones that train on a CPU. A
preset's vocabulary is the teacher's (49,152 for SmolLM2) unless given, so the
student predicts over the same tokens the targets name. This module knows
nothing about DeepSpeed, teachers or losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Preset:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    tie: bool


#: name -> architecture. PD Table 7 (330m ... 6.8b) and CPU-sized students.
PRESETS: dict[str, Preset] = {
    "330m": Preset(1024, 4096, 12, 16, 2, True),
    "670m": Preset(1024, 4096, 24, 16, 2, False),
    "1.9b": Preset(2048, 6912, 24, 16, 2, False),
    "3.8b": Preset(3072, 8192, 28, 24, 8, False),
    "6.8b": Preset(4096, 12800, 28, 32, 8, False),
    # ~16M parameters with a 49,152 vocabulary (12.6M of them the tied embedding).
    "tiny-16m": Preset(256, 704, 4, 4, 2, True),
    # ~7M with a 49,152 vocabulary: the "smaller student" of the demo.
    "tiny-7m": Preset(128, 384, 4, 4, 2, True),
    # Test-sized: a few hundred thousand parameters with a 1,000-token vocabulary.
    "micro": Preset(64, 128, 2, 4, 2, True),
}


def build_student(*, preset: str = "tiny-16m", path: str | None = None, vocab_size: int,
                  max_seq_len: int = 2048, init_seed: int = 0) -> torch.nn.Module:
    """A fp32 causal LM: `path` (a local HF model dir) or a freshly initialised preset."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if path is not None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation="sdpa")
        if model.get_output_embeddings() is None:
            raise ValueError(f"{path}: the model has no LM head (not a causal LM)")
        got = model.get_output_embeddings().weight.shape[0]
        if got != vocab_size:
            raise ValueError(f"{path}: vocabulary {got} != the corpus/teacher's {vocab_size}")
        return model
    if preset not in PRESETS:
        raise ValueError(f"unknown student preset {preset!r}; known: {sorted(PRESETS)}")
    p = PRESETS[preset]
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=p.hidden, intermediate_size=p.ffn,
        num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
        tie_word_embeddings=p.tie, max_position_embeddings=max_seq_len, rope_theta=10000.0,
        attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return LlamaForCausalLM(config)


def num_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
