"""Students pruned from the teacher: fewer blocks, narrower blocks, weights kept.

Minitron-style, from one calibration forward pass of the teacher:
    depth   keep the N blocks whose output differs most from their input
            (importance = 1 - cosine(block input, block output), mean over tokens),
            in their original order;
    width   rank hidden channels by mean |residual stream| at every kept block's two
            norm inputs and the final norm's, FFN neurons by mean |act(gate) * up|,
            query heads by mean |attention output| before o_proj; keep the top ones
            and slice the weights. GQA groups stay whole: kv heads are chosen by the
            summed importance of their query heads, then the same number of query
            heads in each kept group. Embeddings, LM head and every RMSNorm follow the
            kept channels (RMSNorm over fewer channels normalizes differently; that is
            accepted, as in Minitron); head_dim stays the teacher's.
One code path over the module tree the Llama family shares (Llama, Mistral, Qwen2
with q/k/v biases, Qwen3 with q/k norms); any other class is refused by name.
`write_pruned` puts an HF model directory (safetensors, tokenizer, `prune.json`)
in place atomically: a temporary sibling renamed over `out`, so a kill leaves no
half-written student. This module knows nothing about training, corpora formats
beyond `Packer`, or where the teacher came from.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers.initialization import no_init_weights

from logitcast.data.packing import Packer, PackingConfig
from logitcast.data.shards import TokenCorpus

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MANIFEST = "prune.json"
FORMAT, VERSION = "logitcast-prune", 1


class PruneError(ValueError):
    """A prune that cannot be done: unsupported teacher, sizes it cannot have, bad output."""


# ---------------------------------------------------------------------------- sizes


@dataclass(frozen=True, kw_only=True)
class PruneSpec:
    """The student's shape; a size left None is the teacher's."""

    layers: int
    """Decoder blocks kept, in [1, teacher's]."""
    hidden: int | None = None
    """Hidden (residual) channels, at most the teacher's."""
    ffn: int | None = None
    """FFN neurons per block, at most the teacher's."""
    heads: int | None = None
    """Query heads per block; default: kv_heads times the teacher's group size."""
    kv_heads: int | None = None
    """Key/value heads (GQA groups) per block; default: the teacher's."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise PruneError(f"{name} must be a positive integer, got {value!r}")

    def against(self, config: Any) -> PruneSpec:
        """This spec with every size filled in from the teacher's `config`, checked against it."""
        heads, groups = config.num_attention_heads, config.num_key_value_heads
        kv = self.kv_heads or groups
        full = PruneSpec(layers=self.layers, hidden=self.hidden or config.hidden_size,
                         ffn=self.ffn or config.intermediate_size,
                         heads=self.heads or kv * (heads // groups), kv_heads=kv)
        for name, teacher in (("layers", config.num_hidden_layers),
                              ("hidden", config.hidden_size), ("ffn", config.intermediate_size),
                              ("heads", heads), ("kv_heads", groups)):
            if getattr(full, name) > teacher:
                raise PruneError(f"{name} {getattr(full, name)} exceeds the teacher's {teacher}")
        if full.heads % full.kv_heads:
            raise PruneError(f"heads {full.heads} is not a multiple of kv_heads {full.kv_heads}")
        if full.heads // full.kv_heads > heads // groups:
            raise PruneError(f"{full.heads // full.kv_heads} query heads per kv head exceeds the "
                             f"teacher's {heads // groups} (groups are kept whole, never merged)")
        pruned_config(config, full, list(range(full.layers)))  # transformers' own checks, early
        return full


def pruned_config(config: Any, spec: PruneSpec, layers: list[int]) -> Any:
    """The teacher's config resized to `spec` (fully resolved), keeping blocks `layers`."""
    data = config.to_dict()
    data.pop("_name_or_path", None)
    data.update(hidden_size=spec.hidden, intermediate_size=spec.ffn,
                num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                num_hidden_layers=len(layers), head_dim=_head_dim(config))
    if data.get("layer_types") is not None:  # Qwen2/3: per-block sliding or full attention
        data["layer_types"] = [data["layer_types"][i] for i in layers]
    try:
        return type(config).from_dict(data)
    except Exception as exc:  # transformers' strict config validation, several exception types
        raise PruneError(f"{type(config).__name__} refuses the pruned shape {asdict(spec)}: "
                         f"{exc}") from exc


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_supported(model: torch.nn.Module) -> None:
    """Raise PruneError unless `model` is one of the Llama-family classes pruned here."""
    name = type(model).__name__
    if name not in SUPPORTED:
        raise PruneError(f"cannot prune a {name}; supported teachers: {', '.join(SUPPORTED)}")


# ---------------------------------------------------------------------------- calibration


def calibration_rows(corpus: TokenCorpus, rows: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """int64 [rows, seq_len]: the first rows the trainer's `Packer` makes of `corpus`."""
    packer = Packer(corpus, PackingConfig(seq_len=seq_len, global_batch=rows, seed=seed))
    if packer.rows_per_epoch < rows:
        raise PruneError(f"calibration corpus {corpus.directory} holds {packer.rows_per_epoch} "
                         f"rows of {seq_len} tokens, {rows} asked for")
    return packer.batch(0).input_ids


@dataclass(frozen=True)
class Importance:
    """Means over the calibration tokens (float64)."""

    blocks: torch.Tensor
    """[L]: 1 - cosine(block input, block output)."""
    channels: torch.Tensor
    """[L + 1, hidden]: |input| of block l's two norms (row l), of the final norm (row L)."""
    neurons: torch.Tensor
    """[L, ffn]: |act(gate) * up|, the down projection's input."""
    heads: torch.Tensor
    """[L, heads]: |attention output| of each query head, before o_proj."""


@torch.inference_mode()
def measure_importance(model: torch.nn.Module, tokens: torch.Tensor,
                       batch_rows: int = 4) -> Importance:
    """Block, channel, neuron and head importance of `model` on `tokens` (int64 [B, T])."""
    check_supported(model)
    config, body = model.config, model.model
    n_layers, hd = len(body.layers), _head_dim(config)
    device = body.embed_tokens.weight.device
    sums = Importance(*(torch.zeros(*shape, dtype=torch.float64, device=device) for shape in (
        (n_layers,), (n_layers + 1, config.hidden_size), (n_layers, config.intermediate_size),
        (n_layers, config.num_attention_heads))))
    inputs: dict[int, torch.Tensor] = {}

    def add_abs(row: torch.Tensor, heads: bool = False):
        def hook(module, args):
            x = args[0].detach().double().abs()
            row.add_(x.unflatten(-1, (-1, hd)).mean(-1).sum((0, 1)) if heads else x.sum((0, 1)))
        return hook

    def block_in(i: int):
        def hook(module, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def block_out(i: int):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(inputs.pop(i).double(), out.double(), dim=-1)
            sums.blocks[i] += (1 - cos).sum()
        return hook

    hooks = [body.norm.register_forward_pre_hook(add_abs(sums.channels[n_layers]))]
    for i, block in enumerate(body.layers):
        hooks += [block.register_forward_pre_hook(block_in(i), with_kwargs=True),
                  block.register_forward_hook(block_out(i), with_kwargs=True),
                  block.input_layernorm.register_forward_pre_hook(add_abs(sums.channels[i])),
                  block.post_attention_layernorm.register_forward_pre_hook(
                      add_abs(sums.channels[i])),
                  block.mlp.down_proj.register_forward_pre_hook(add_abs(sums.neurons[i])),
                  block.self_attn.o_proj.register_forward_pre_hook(
                      add_abs(sums.heads[i], heads=True))]
    was_training = model.training
    model.eval()
    try:
        for chunk in tokens.split(batch_rows):
            body(input_ids=chunk.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    n = tokens.numel()
    return Importance(*(t.cpu() / n for t in (sums.blocks, sums.channels, sums.neurons,
                                              sums.heads)))


# ---------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PrunePlan:
    """Which teacher indices the student keeps; all sorted, in the teacher's order."""

    layers: list[int]
    channels: torch.Tensor
    """int64 [hidden]"""
    neurons: list[torch.Tensor]
    """per kept block: int64 [ffn]"""
    heads: list[torch.Tensor]
    """per kept block: int64 [heads], query heads"""
    kv_heads: list[torch.Tensor]
    """per kept block: int64 [kv_heads]"""


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order."""
    return torch.topk(scores, k).indices.sort().values


def plan_pruning(importance: Importance, config: Any, spec: PruneSpec) -> PrunePlan:
    """The indices `spec` (resolved by `against`) keeps, by `importance`."""
    layers = _top(importance.blocks, spec.layers).tolist()
    channels = _top(importance.channels[[*layers, len(importance.blocks)]].sum(0), spec.hidden)
    group = config.num_attention_heads // config.num_key_value_heads
    per_group = spec.heads // spec.kv_heads
    neurons, heads, kv_heads = [], [], []
    for i in layers:
        neurons.append(_top(importance.neurons[i], spec.ffn))
        by_group = importance.heads[i].view(-1, group)
        kv = _top(by_group.sum(1), spec.kv_heads)
        kv_heads.append(kv)
        heads.append(torch.cat([g * group + _top(by_group[g], per_group) for g in kv.tolist()]))
    return PrunePlan(layers, channels, neurons, heads, kv_heads)


# ---------------------------------------------------------------------------- slicing

#: module name -> what each weight axis indexes (bias: the first); None keeps the axis whole
_AXES = {
    "embed_tokens": (None, "hidden"), "lm_head": (None, "hidden"), "norm": ("hidden",),
    "input_layernorm": ("hidden",), "post_attention_layernorm": ("hidden",),
    "q_proj": ("q", "hidden"), "k_proj": ("kv", "hidden"), "v_proj": ("kv", "hidden"),
    "o_proj": ("hidden", "q"), "q_norm": (None,), "k_norm": (None,),
    "gate_proj": ("ffn", "hidden"), "up_proj": ("ffn", "hidden"), "down_proj": ("hidden", "ffn"),
}


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Projection rows of `heads`: int64 [len(heads) * head_dim]."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def prune_model(teacher: torch.nn.Module, plan: PrunePlan, spec: PruneSpec) -> torch.nn.Module:
    """A new model of the teacher's class and dtype holding the weights `plan` keeps."""
    check_supported(teacher)
    config = pruned_config(teacher.config, spec, plan.layers)
    hd = _head_dim(teacher.config)
    dtype = teacher.get_input_embeddings().weight.dtype
    with no_init_weights():  # every weight is overwritten below: initialising them is wasted
        student = type(teacher)(config)
    student.tie_weights()  # tying is part of the initialisation skipped above
    student.to(dtype)
    source = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        parts = name.split(".")
        index: dict[str | None, torch.Tensor | None] = {None: None, "hidden": plan.channels}
        if parts[:2] == ["model", "layers"]:
            j = int(parts[2])
            parts[2] = str(plan.layers[j])
            index.update(q=_rows(plan.heads[j], hd), kv=_rows(plan.kv_heads[j], hd),
                         ffn=plan.neurons[j])
        if parts[-2] not in _AXES:
            raise PruneError(f"{type(teacher).__name__} has {name}, which no rule here prunes")
        axes = _AXES[parts[-2]][:1] if parts[-1] == "bias" else _AXES[parts[-2]]
        tensor = source[".".join(parts)]
        for dim, axis in enumerate(axes):
            if index[axis] is not None:
                tensor = tensor.index_select(dim, index[axis].to(tensor.device))
        state[name] = tensor
    student.load_state_dict(state, strict=True)
    assert (student.get_output_embeddings().weight is student.get_input_embeddings().weight
            ) == bool(config.tie_word_embeddings), "tied embeddings must stay tied, only those"
    return student.eval()


def teacher_sizes(config: Any) -> dict:
    """The teacher's sizes under `PruneSpec`'s names, plus its head_dim."""
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "ffn": config.intermediate_size, "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "head_dim": _head_dim(config)}


@dataclass
class Pruned:
    """A pruned student and how it was chosen."""

    model: torch.nn.Module
    spec: PruneSpec
    plan: PrunePlan
    importance: Importance
    teacher_class: str
    teacher_sizes: dict

    def manifest(self, **about: Any) -> dict:
        """JSON-ready record of the prune; `about` adds fields (teacher name, calibration)."""
        return {"format": FORMAT, "version": VERSION, "teacher_class": self.teacher_class,
                **about, "teacher_sizes": self.teacher_sizes, "sizes": asdict(self.spec),
                "kept_layers": self.plan.layers,
                "block_importance": [round(v, 6) for v in self.importance.blocks.tolist()],
                "kept_kv_heads": [t.tolist() for t in self.plan.kv_heads],
                "kept_heads": [t.tolist() for t in self.plan.heads]}


def prune(teacher: torch.nn.Module, spec: PruneSpec, calibration: torch.Tensor) -> Pruned:
    """Measure `teacher` on `calibration` (int64 [B, T]) and cut it to `spec`."""
    check_supported(teacher)
    spec = spec.against(teacher.config)
    importance = measure_importance(teacher, calibration)
    plan = plan_pruning(importance, teacher.config, spec)
    return Pruned(prune_model(teacher, plan, spec), spec, plan, importance,
                  type(teacher).__name__, teacher_sizes(teacher.config))


# ---------------------------------------------------------------------------- output


def check_out(out: Path, force: bool) -> None:
    """Raise PruneError when writing `out` would overwrite something without --force."""
    if out.exists() and not out.is_dir():
        raise PruneError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PruneError(f"--out {out} is not empty; pass --force to replace it")


def write_pruned(model: torch.nn.Module, tokenizer: Any | None, out: str | os.PathLike[str],
                 manifest: dict, *, force: bool = False) -> Path:
    """Save `model` (safetensors), `tokenizer` and `manifest` as the directory `out`, atomically."""
    out = Path(out)
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        partial.chmod(0o755)  # mkdtemp's 0700 would hide the student from other users
        check_out(out, force)
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
