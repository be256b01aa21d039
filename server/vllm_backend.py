"""The vLLM teacher backend: vLLM runs the trunk, our code runs the LM head and sparsify.

vLLM's pooling runner (`runner="pooling"`, task `token_embed`, token pooling `ALL`,
no activation) returns the final (normed) hidden state of every prompt position as one
tensor per prompt. `VLLMBackend.hidden_states` submits each row (row mode) or each
document segment (document mode: positions restart, attention stays inside the
document) as its own token prompt, all of a batch in one `LLM.encode` call, so vLLM
batches them itself (continuous batching, paged attention, tensor parallelism,
quantised weights). `logits` multiplies one chunk of positions by the LM head weight,
read once from the checkpoint's safetensors, on the teacher's device: no [tokens x V]
tensor for a whole batch and no per-entry Python objects (vLLM's `prompt_logprobs`
route builds one per vocabulary entry and crawls at ~4 tok/s for full distributions).

Determinism: on CUDA devices of compute capability >= 8.0 the backend turns on vLLM's
batch-invariant mode (`VLLM_BATCH_INVARIANT=1`) in this process, which also covers our
LM-head matmul, and keeps the engine in-process so it applies to both. Prefix caching
and chunked prefill are off: a prompt is always computed whole and from scratch, so
its hidden states cannot depend on what was cached or scheduled beside it.

This module does not know about requests, batching policy, sparsifying or gRPC.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logitcast.ops.rowkey import segments

logger = logging.getLogger(__name__)

VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Suffix of a vLLM-served teacher's id: its targets agree with the transformers
#: backend's statistically, not byte for byte, so they get their own cache namespace.
TEACHER_ID_SUFFIX = "+vllm"


class TeacherLoadError(RuntimeError):
    """The teacher cannot be served: vLLM cannot load it, or it is inconsistent."""


@dataclass(kw_only=True)
class VLLMOptions:
    """How vLLM runs the teacher (`logitcast serve --backend vllm ...`)."""

    tensor_parallel_size: int = 1
    """GPUs one teacher spans (tensor parallelism); 1 on CPU."""
    max_model_len: int | None = None
    """Longest prompt (row or document segment); None: the model's own limit."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory vLLM may take (weights, activations, KV cache)."""
    quantization: str | None = None
    """A quantisation vLLM loads (awq, gptq, fp8, ...); None: as the checkpoint says."""
    enforce_eager: bool | None = None
    """Skip torch.compile / CUDA graphs. None: eager on CPU (compiling costs minutes
    per start there and gains little), compiled on GPU."""
    batch_invariant: str = "auto"
    """auto (on where vLLM supports it: CUDA compute capability >= 8.0), on, or off."""
    kv_cache_gib: int = 2
    """CPU only: KV cache space (VLLM_CPU_KVCACHE_SPACE); prefill-only prompts need
    little, but every prompt of a batch is resident at once."""
    max_num_seqs: int = 256
    """Prompts vLLM runs in one step."""

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must lie in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        if self.batch_invariant not in ("auto", "on", "off"):
            raise ValueError(f"batch_invariant must be auto, on or off, got {self.batch_invariant!r}")
        if not isinstance(self.kv_cache_gib, int) or self.kv_cache_gib < 1:
            raise ValueError(f"kv_cache_gib must be a whole number >= 1, got {self.kv_cache_gib!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


def supports_batch_invariance(device: torch.device) -> bool:
    """Whether vLLM 0.32's batch-invariant mode covers this device (NVIDIA, cc >= 8.0)."""
    if device.type != "cuda" or not torch.cuda.is_available() or torch.version.hip:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_model_dir(model: str) -> tuple[str, str]:
    """(what vLLM loads, the teacher id's base) for a --model value."""
    if model == "default":
        from logitcast.server.embedded import EMBEDDED_TEACHER_ID, embedded_teacher_dir

        return str(embedded_teacher_dir()), EMBEDDED_TEACHER_ID
    if model == "tiny" or model.startswith("random:"):
        raise ValueError(f"model {model!r} is a random test model of the transformers backend; "
                         "the vLLM backend serves checkpoints (a directory or hub id)")
    if model.endswith(".gguf"):
        raise ValueError(f"model {model!r}: vLLM does not load this GGUF as a pooling model; "
                         "convert it to safetensors (the 'default' teacher is converted for you)")
    return model, model


def read_lm_head(model_dir: str | os.PathLike[str]) -> torch.Tensor:
    """The LM head weight [V, d] from a local safetensors checkpoint (sharded or not);
    the input embedding when the config ties them."""
    from safetensors import safe_open

    root = Path(model_dir)
    if not root.is_dir():
        raise TeacherLoadError(f"{model_dir}: the vLLM backend needs a local checkpoint "
                               "directory to read the LM head from")
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise TeacherLoadError(f"{root}/config.json: {exc}") from exc
    text = config.get("text_config") or {}
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise TeacherLoadError(f"{root}: no *.safetensors files (vLLM backend reads the "
                                   "LM head from safetensors)")
        weight_map = {}
        for f in files:
            with safe_open(f, framework="pt") as st:
                weight_map.update(dict.fromkeys(st.keys(), f.name))
    wanted = ["lm_head.weight", "language_model.lm_head.weight"]
    if tied:
        wanted += ["model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
                   "language_model.model.embed_tokens.weight", "transformer.wte.weight"]
    for name in wanted:
        if name in weight_map:
            with safe_open(root / weight_map[name], framework="pt") as st:
                return st.get_tensor(name)
    raise TeacherLoadError(f"{root}: no LM head weight among {wanted} (tie_word_embeddings="
                           f"{tied}); quantised LM heads are not supported")


class VLLMBackend:
    """A teacher served by vLLM's pooling runner, with the LM head applied by us."""

    name = "vllm"
    supports_documents = True

    def __init__(self, model: str = "default", *, dtype: str = "bf16", device: str = "cpu",
                 options: VLLMOptions | None = None) -> None:
        if dtype not in VLLM_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(VLLM_DTYPES)}, got {dtype!r}")
        self.options = opts = options or VLLMOptions()
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"vLLM backend: device must be cpu or cuda[:N], got {device!r}")
        if self.device.type == "cpu" and opts.tensor_parallel_size != 1:
            raise ValueError("vLLM backend: tensor parallelism needs GPUs (device cuda)")
        model_dir, base_id = resolve_model_dir(model)
        self.batch_invariant = self._setup_determinism(opts.batch_invariant)
        self.dtype = TORCH_DTYPES[dtype]
        head = read_lm_head(model_dir)
        self.lm_head = head.to(self.device, self.dtype)
        self.vocab_size = int(head.shape[0])
        self.tokenizer_fingerprint = self._check_tokenizer(model_dir)
        self._configure_env()
        self.llm = self._start_engine(model_dir, dtype)
        self.max_seq_len = int(self.llm.llm_engine.model_config.max_model_len)
        suffix = "" if dtype == "bf16" else f"@{dtype}"
        self.teacher_id = f"{base_id}{suffix}{TEACHER_ID_SUFFIX}"
        from vllm import PoolingParams

        self._params = PoolingParams(use_activation=False)
        logger.info("vLLM backend: %s (%s, %s), vocab %d, max_seq_len %d, batch-invariant %s",
                    model_dir, dtype, self.device, self.vocab_size, self.max_seq_len,
                    self.batch_invariant)

    # ------------------------------------------------------------------ startup

    def _setup_determinism(self, mode: str) -> bool:
        supported = supports_batch_invariance(self.device)
        if mode == "on" and not supported:
            raise ValueError(f"batch_invariant=on: vLLM's batch-invariant mode needs an NVIDIA "
                             f"GPU of compute capability >= 8.0, not {self.device}")
        if mode == "off" or not supported:
            return False
        os.environ["VLLM_BATCH_INVARIANT"] = "1"
        from vllm.model_executor.determinism.batch_invariant import init_batch_invariance

        init_batch_invariance()  # our LM-head matmul runs in this process too
        return True

    def _configure_env(self) -> None:
        opts = self.options
        # the engine in this process: our LM head shares its device (and, in batch-invariant
        # mode, its matmul overrides); no second process to start, feed and kill
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if self.device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(opts.kv_cache_gib))
            # vLLM's CPU worker drops torch to 1 thread unless OMP_NUM_THREADS is set, and
            # then forbids torch.set_num_threads: keep the threads this process was given
            # (vLLM's CPU core binding applies to its multiprocess executor only, not here)
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

    def _check_tokenizer(self, model_dir: str) -> str:
        from transformers import AutoConfig, AutoTokenizer

        from logitcast.server.embedded import tokenizer_fingerprint

        try:
            config = AutoConfig.from_pretrained(model_dir)
            tok = AutoTokenizer.from_pretrained(model_dir)
        except Exception as exc:
            raise TeacherLoadError(f"{model_dir}: cannot read config/tokenizer: {exc}") from exc
        text = getattr(config, "text_config", None) or config
        declared = getattr(text, "vocab_size", None)
        if declared is not None and int(declared) != self.vocab_size:
            raise TeacherLoadError(f"{model_dir}: config vocab_size {declared} but the LM head "
                                   f"has {self.vocab_size} rows")
        if len(tok) > self.vocab_size:
            raise TeacherLoadError(f"{model_dir}: the tokenizer has {len(tok)} tokens but the "
                                   f"model's LM head only {self.vocab_size}: vocabulary mismatch")
        return tokenizer_fingerprint(tok)

    def _start_engine(self, model_dir: str, dtype: str) -> Any:
        from vllm import LLM
        from vllm.config import PoolerConfig

        opts = self.options
        eager = opts.enforce_eager
        if eager is None:
            eager = self.device.type == "cpu"
        kwargs: dict[str, Any] = {
            "model": model_dir, "runner": "pooling", "convert": "embed",
            "pooler_config": PoolerConfig(task="token_embed", tok_pooling_type="ALL",
                                          use_activation=False),
            "dtype": VLLM_DTYPES[dtype], "tensor_parallel_size": opts.tensor_parallel_size,
            "max_model_len": opts.max_model_len, "quantization": opts.quantization,
            "enforce_eager": eager, "enable_prefix_caching": False,
            "enable_chunked_prefill": False, "max_num_seqs": opts.max_num_seqs, "seed": 0,
        }
        if self.device.type == "cuda":
            kwargs["gpu_memory_utilization"] = opts.gpu_memory_utilization
        try:
            return LLM(**kwargs)
        except Exception as exc:
            raise TeacherLoadError(f"vLLM cannot load {model_dir}: {type(exc).__name__}: "
                                   f"{exc}") from exc

    # ------------------------------------------------------------------ the interface

    def hidden_states(self, tokens: torch.Tensor,
                      document_ids: torch.Tensor | None = None) -> torch.Tensor:
        from vllm.inputs import TokensPrompt

        b, t = tokens.shape
        if document_ids is None:
            spans = [(r, 0, t) for r in range(b)]
        else:
            spans = segments(document_ids)
        rows = tokens.cpu().tolist()
        prompts = [TokensPrompt(prompt_token_ids=rows[r][s:e]) for r, s, e in spans]
        outputs = self.llm.encode(prompts, self._params, pooling_task="token_embed",
                                  use_tqdm=False)
        out = None
        for (r, s, e), o in zip(spans, outputs, strict=True):
            h = o.outputs.data
            if h.shape[0] != e - s:
                raise RuntimeError(f"vLLM returned {h.shape[0]} hidden states for a prompt of "
                                   f"{e - s} tokens (row {r}, positions {s}..{e})")
            if out is None:
                out = torch.empty(b, t, h.shape[-1], dtype=self.dtype, device=self.device)
            out[r, s:e] = h
        return out

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden.to(self.lm_head.dtype) @ self.lm_head.T).float()
