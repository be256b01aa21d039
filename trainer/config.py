"""`TrainConfig`: everything a training run needs, as typed dataclasses read from YAML/JSON.

Each section is a keyword-only dataclass with a default and a docstring under
every field, and checks itself in `__post_init__` (ValueError naming the
field). `load_config` reads a file, applies `--set a.b=c` overrides and builds
the tree; an unknown key anywhere is a `ConfigError` naming its dotted path and
the keys that exist. The DeepSpeed section is DeepSpeed's own JSON format, kept
as a dict (or a path to a JSON file); the fields we own (batch sizes, clipping,
precision) are filled in by the trainer and must not contradict it.

This module knows nothing about models, devices or processes.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logitcast.cache.steps import check_step_window
from logitcast.data.packing import PackingConfig
from logitcast.ops import KD_LOSSES, TargetSpec
from logitcast.ops.kd_terms import HEAD_LOSSES
from logitcast.ops.schedules import ALPHA_SCHEDULES, LR_SCHEDULES, alpha_at, lr_at


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names which."""


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


# ---------------------------------------------------------------------------- sections


@dataclass(kw_only=True)
class StudentConfig:
    """Which student to train."""

    preset: str = "tiny-16m"
    """A name in `trainer.students.PRESETS` (PD Table 7 sizes, plus tiny CPU ones)."""
    path: str | None = None
    """A local HF model directory to start from instead of a preset (its weights are kept)."""
    vocab_size: int | None = None
    """Preset vocabulary; None takes the corpus tokenizer's (the teacher's) vocabulary."""
    max_seq_len: int = 2048
    """Preset position limit (RoPE max_position_embeddings)."""
    init_seed: int = 0
    """Seed of a preset's random initialisation (every rank builds the same weights)."""
    freeze_embeddings: bool = False
    """Keep the input embedding and the LM head (tied or not) fixed; only the blocks and
    norms train. For a student pruned from the teacher: it keeps the teacher's vocabulary
    geometry, and on a CPU the step is ~1.6x faster (no [V x d] gradients or AdamW state)."""

    def __post_init__(self) -> None:
        from logitcast.trainer.students import PRESETS

        if self.path is None and self.preset not in PRESETS:
            raise ConfigError(f"student.preset must be one of {sorted(PRESETS)}, "
                              f"got {self.preset!r}")
        if self.vocab_size is not None:
            _positive("student.vocab_size", self.vocab_size)


@dataclass(kw_only=True)
class TeacherConfig:
    """Where the soft targets come from."""

    source: str = "none"
    """online (teacher servers), cache (a target cache, no teacher) or none (CE only)."""
    addresses: list[str] = field(default_factory=list)
    """online: host:port of each teacher server (or the Ray Serve proxy)."""
    cache_dir: str | None = None
    """cache: the cache root to read. online: also read hits from (and, with
    write_cache, store misses into) this cache."""
    write_cache: bool = False
    """online: store fetched targets into cache_dir (off when the servers tee into it)."""
    cache_on_corrupt: str = "error"
    """cache: a damaged record is an error (error) or leaves its row without targets
    (skip; counted in logitcast_client_cache_corrupt_records_total). Online, a damaged
    record is always fetched from the teacher again."""
    teacher_id: str | None = None
    """Expected teacher id; cache: picks the namespace when the cache holds several."""
    spec: dict[str, Any] = field(default_factory=lambda: {"method": "sample", "unique": 12.0})
    """The targets the student trains on (`TargetSpec` fields)."""
    stored_spec: dict[str, Any] | None = None
    """cache: the spec the targets were stored with, when `spec` is derived from it
    (thinned, truncated); None means the same as `spec`."""
    prefetch: int = 4
    """Steps fetched ahead of the trainer."""
    auth_token: str | None = None
    """online: bearer token the servers expect."""
    allow_insecure_auth: bool = False
    """online: send auth_token over plain (non-TLS) gRPC to addresses off this machine;
    without it the client refuses (loopback addresses are always allowed)."""
    application: str | None = None
    """online: the Ray Serve application name when the addresses are Ray Serve gRPC
    proxies (`logitcast fleet up` serves 'logitcast')."""
    steps: list[int] | None = None
    """cache: [lo, hi), serve only targets recorded at teacher steps lo <= step < hi
    (a recorded run, `record`); a row recorded outside it is a miss. None: all."""

    def __post_init__(self) -> None:
        if self.source not in ("online", "cache", "none"):
            raise ConfigError(f"teacher.source must be online, cache or none, got {self.source!r}")
        if self.source == "online" and not self.addresses:
            raise ConfigError("teacher.addresses is empty; online needs at least one server")
        if self.source == "cache" and not self.cache_dir:
            raise ConfigError("teacher.cache_dir is required when teacher.source is cache")
        if self.write_cache and not self.cache_dir:
            raise ConfigError("teacher.write_cache needs teacher.cache_dir")
        if self.cache_on_corrupt not in ("error", "skip"):
            raise ConfigError(f"teacher.cache_on_corrupt must be error or skip, "
                              f"got {self.cache_on_corrupt!r}")
        if self.prefetch < 1:
            raise ConfigError(f"teacher.prefetch must be >= 1, got {self.prefetch}")
        if self.steps is not None:
            if self.source != "cache":
                raise ConfigError(f"teacher.steps (a window of recorded teacher steps) needs "
                                  f"teacher.source cache, got {self.source!r}")
            try:
                check_step_window(self.steps)
            except ValueError as exc:
                raise ConfigError(f"teacher.steps: {exc}") from exc
        self.target_spec()
        self.stored_target_spec()

    def target_spec(self) -> TargetSpec:
        return _spec("teacher.spec", self.spec)

    def stored_target_spec(self) -> TargetSpec:
        return _spec("teacher.stored_spec", self.stored_spec or self.spec)


def _spec(name: str, d: dict) -> TargetSpec:
    try:
        return TargetSpec.from_dict(d)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{name}: {exc}") from exc


@dataclass(kw_only=True)
class RecordConfig:
    """Teacher-recording mode (PD §3.5): the model trained here (plain CE) is the teacher,
    and the sparse targets of every row it trains on go into a target cache."""

    cache_dir: str | None = None
    """Local cache directory to record into; None: no recording."""
    run: str | None = None
    """Run name; the namespace's teacher id is `record:<run>`. None: output_dir's name."""
    spec: dict[str, Any] = field(default_factory=lambda: {"method": "sample", "unique": 12.0})
    """The recorded targets (`TargetSpec` fields); RS-12 as the trainer asks servers for."""
    extras: list[str] = field(default_factory=lambda: ["logprob"])
    """Per-position floats stored with the targets: logprob, entropy."""
    chunk_size: int = 256
    """Positions whose logits exist at once while sparsifying (a server's default)."""
    max_queue: int = 8
    """Micro-batches of targets waiting for the cache writer; beyond it training waits."""
    queue_timeout_s: float = 600.0
    """Training waiting this long for room in the queue is an error (a stuck writer)."""
    shard_bytes: int = 256 << 20
    """Cache shard size."""

    def __post_init__(self) -> None:
        if self.run is not None and not self.run:
            raise ConfigError("record.run is empty; leave it out to use output_dir's name")
        for name in ("chunk_size", "max_queue", "queue_timeout_s", "shard_bytes"):
            _positive(f"record.{name}", getattr(self, name))
        bad = sorted(set(self.extras) - {"logprob", "entropy"})
        if bad:
            raise ConfigError(f"record.extras {bad} unknown; choose from logprob, entropy")
        self.target_spec()

    @property
    def enabled(self) -> bool:
        return self.cache_dir is not None

    def target_spec(self) -> TargetSpec:
        return _spec("record.spec", self.spec)


@dataclass(kw_only=True)
class DataConfig:
    """Which rows the student sees."""

    train_tokens: str = ""
    """Token shard directory (`logitcast tokenize`) of the training corpus."""
    eval_tokens: str | None = None
    """Token shard directory of the held-out documents; None disables eval."""
    seq_len: int = 512
    """Tokens per row; must equal the teacher side's (targets are per packed row)."""
    global_batch: int = 8
    """Rows per optimizer step over all ranks = micro_batch * grad_accum * world."""
    micro_batch: int = 0
    """Rows per forward/backward on one rank; 0 = global_batch / world (no accumulation)."""
    seed: int = 0
    """Packing shuffle seed."""
    mode: str = "rows"
    """rows (causal across documents) or documents (attention within each document)."""
    max_document_tokens: int = 512
    """documents: pieces of at most this many tokens."""

    def __post_init__(self) -> None:
        if not self.train_tokens:
            raise ConfigError("data.train_tokens is required (a `logitcast tokenize` output)")
        for name in ("seq_len", "global_batch"):
            _positive(f"data.{name}", getattr(self, name))
        _positive("data.micro_batch", self.micro_batch, allow_zero=True)
        if self.mode not in ("rows", "documents"):
            raise ConfigError(f"data.mode must be rows or documents, got {self.mode!r}")
        try:
            self.packing()
        except ValueError as exc:
            raise ConfigError(f"data: {exc}") from exc

    def packing(self, global_batch: int | None = None) -> PackingConfig:
        """The packer's config (another global batch for held-out rows)."""
        return PackingConfig(seq_len=self.seq_len, global_batch=global_batch or self.global_batch,
                             seed=self.seed, mode=self.mode,
                             max_document_tokens=self.max_document_tokens)


@dataclass(kw_only=True)
class LossConfig:
    """How the student learns from labels and targets."""

    kd: str = "kl"
    """KD loss: one of `ops.KD_LOSSES` (nll, kl, mse, ghost, naive_fix, tad)."""
    temperature: float = 1.0
    """Student temperature inside the KD term (the teacher's is in the target spec)."""
    normalize: bool = False
    """nll/kl/mse: renormalise target weights over their support (vanilla top-k KD)."""
    beta: float = 2.0
    """tad: tail weight."""
    alpha: dict[str, Any] = field(default_factory=lambda: {"name": "constant", "value": 0.5})
    """KD weight schedule: {"name": one of ops.ALPHA_SCHEDULES, ...its parameters};
    total_steps defaults to the run's steps (warmup_frac / decay_frac as for the LR).
    alpha is 0 when teacher.source is none."""
    fused: bool = True
    """Chunked fused loss from the last hidden state (no [tokens, V] logits held)."""
    chunk_size: int = 512
    """Positions per chunk of the fused loss."""

    def __post_init__(self) -> None:
        if self.kd not in KD_LOSSES:
            raise ConfigError(f"loss.kd must be one of {sorted(KD_LOSSES)}, got {self.kd!r}")
        _positive("loss.temperature", self.temperature)
        _positive("loss.beta", self.beta, allow_zero=True)
        _positive("loss.chunk_size", self.chunk_size)
        _schedule("loss.alpha", self.alpha, ALPHA_SCHEDULES)


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (a torch optimizer handed to DeepSpeed)."""

    lr: dict[str, Any] = field(default_factory=lambda: {
        "name": "cosine", "peak": 1e-3, "warmup_frac": 0.05, "floor": 1e-4})
    """LR schedule: {"name": one of ops.LR_SCHEDULES, ...}; total_steps defaults to the run's;
    warmup_frac / decay_frac give warmup_steps / decay_steps as fractions of it."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms and biases)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (DeepSpeed gradient_clipping); 0 disables."""

    def __post_init__(self) -> None:
        _schedule("optim.lr", self.lr, LR_SCHEDULES)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.eps", self.eps)
        _positive("optim.grad_clip", self.grad_clip, allow_zero=True)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")


def _schedule(name: str, d: dict, registry: dict) -> None:
    if d.get("name") not in registry:
        raise ConfigError(f"{name}.name must be one of {sorted(registry)}, got {d.get('name')!r}")


def schedule(d: dict, steps: int, registry: dict) -> tuple[str, dict]:
    """(name, params) of a schedule section, total_steps defaulting to the run's steps."""
    params = dict(d)
    kind = params.pop("name")
    if "total_steps" in inspect.signature(registry[kind]).parameters:
        params.setdefault("total_steps", steps)
    for name in ("warmup", "decay"):  # warmup_frac / decay_frac: fractions of total_steps
        if f"{name}_frac" in params:
            frac = params.pop(f"{name}_frac")
            _positive(f"{name}_frac", frac, allow_zero=True)
            params[f"{name}_steps"] = round(frac * params.get("total_steps", steps))
    return kind, params


def _check_schedule(name: str, d: dict, steps: int, registry: dict) -> None:
    kind, params = schedule(d, steps, registry)
    at = alpha_at if registry is ALPHA_SCHEDULES else lr_at
    try:
        for step in (0, steps // 2, steps):
            at(step, kind, **params)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from exc


@dataclass(kw_only=True)
class EvalConfig:
    """Held-out evaluation: LM loss, KL to the teacher, ECE, top-1 agreement."""

    every: int = 50
    """Evaluate every this many steps (and after the last); 0 disables."""
    rows: int = 16
    """Held-out rows evaluated (split over ranks)."""
    source: str = "same"
    """Targets for eval rows: same (as teacher.source), online, cache or none."""
    spec: dict[str, Any] = field(default_factory=lambda: {
        "method": "head_tail", "k_head": 4, "unique": 12.0})
    """Eval target spec: the exact head gives the teacher's top-1; with the entropy
    extra the sampled tail gives an unbiased KL estimate."""

    def __post_init__(self) -> None:
        _positive("eval.every", self.every, allow_zero=True)
        _positive("eval.rows", self.rows)
        if self.source not in ("same", "online", "cache", "none"):
            raise ConfigError(f"eval.source must be same, online, cache or none, "
                              f"got {self.source!r}")
        spec = _spec("eval.spec", self.spec)
        if spec.method not in ("full", "sample", "head_tail") or spec.temperature != 1.0:
            raise ConfigError("eval.spec must cover the whole teacher distribution at "
                              "temperature 1 (method full, sample or head_tail) for an unbiased "
                              f"KL; got {spec.method} at temperature {spec.temperature}")


@dataclass(kw_only=True)
class TrainConfig:
    """A whole run."""

    steps: int = 100
    """Optimizer steps."""
    stop_at: int | None = None
    """Stop at this step (checkpointed) without finishing: a time-boxed job that a later
    run resumes. The schedules still span `steps`."""
    output_dir: str = "runs/student"
    """Checkpoints, log.jsonl and the exported student go here."""
    save_every: int = 0
    """Checkpoint every this many steps (and at the end); 0 saves only at the end."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept."""
    resume: bool = True
    """Continue from the newest checkpoint in output_dir when there is one."""
    precision: str = "auto"
    """auto (bf16 where the device supports it, i.e. CUDA with bf16; else fp32), bf16 or fp32."""
    metrics_port: int | None = None
    """Prometheus /metrics on this port + local rank; 0 picks free ports; None disables."""
    metrics_host: str = "127.0.0.1"
    """Interface of the /metrics endpoint (0.0.0.0 to let a remote Prometheus scrape)."""
    metrics_sd_dir: str | None = None
    """Register each rank's /metrics for Prometheus file_sd as trainer-<rank>.json here."""
    progress: bool = True
    """tqdm bar on rank 0."""
    export: bool = True
    """save_pretrained (safetensors) the final student into output_dir/student."""
    export_tokenizer: str | None = None
    """Also save this tokenizer with the student: 'default' (embedded teacher's) or a path."""
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig
    """Required: at least data.train_tokens."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: dict[str, Any] | str = field(default_factory=lambda: {
        "zero_optimization": {"stage": 0}})
    """DeepSpeed config (its own JSON format) or a path to one. An `optimizer` block is
    refused (we pass a torch AdamW: a config optimizer JIT-builds FusedAdam)."""

    def __post_init__(self) -> None:
        _positive("steps", self.steps)
        _check_schedule("loss.alpha", self.loss.alpha, self.steps, ALPHA_SCHEDULES)
        _check_schedule("optim.lr", self.optim.lr, self.steps, LR_SCHEDULES)
        _positive("save_every", self.save_every, allow_zero=True)
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps:
            raise ConfigError(f"stop_at must be in [1, steps={self.steps}], got {self.stop_at}")
        _positive("keep_checkpoints", self.keep_checkpoints)
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        ds = self.deepspeed_config()
        if "optimizer" in ds:
            raise ConfigError("deepspeed.optimizer is not supported: logitcast passes a torch "
                              "AdamW (configure it under optim)")
        if "scheduler" in ds:
            raise ConfigError("deepspeed.scheduler is not supported: use optim.lr")
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_optimization.stage must be 0-3, got {stage!r}")
        if self.teacher.cache_on_corrupt == "skip" and self.loss.kd in HEAD_LOSSES:
            raise ConfigError(f"teacher.cache_on_corrupt=skip leaves rows without head entries, "
                              f"which loss.kd={self.loss.kd} needs at every position")
        if self.record.enabled and self.teacher.source != "none":
            raise ConfigError(f"record: a recording run trains with plain CE; teacher.source "
                              f"must be none, got {self.teacher.source!r}")
        if self.record.enabled and self.data.mode != "rows":
            raise ConfigError("record needs data.mode=rows: in document mode the trainer "
                              "attends within documents through a mask while a teacher server "
                              "runs each document alone, so the targets would not be the "
                              "server's bytes")
        if self.eval.source == "same" and self.teacher.source == "none":
            self.eval.source = "none"

    def deepspeed_config(self) -> dict:
        if isinstance(self.deepspeed, dict):
            return dict(self.deepspeed)
        path = Path(self.deepspeed)
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"deepspeed config {path}: {exc}") from exc

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- loading


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from plain data; unknown keys and wrong types raise ConfigError."""
    where = path or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(f'{path}.{k}'.lstrip('.') for k in unknown)}; "
                          f"{where} takes {', '.join(sorted(names))}")
    kwargs = {k: _convert(hints[k], v, f"{path}.{k}".lstrip(".")) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of "
                          f"{tp}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool) or tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{path} must be {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{path} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _yaml(text: str) -> Any:
    """yaml.safe_load, reading 1e-3 as a float (YAML 1.1 wants 1.0e-3)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$"
                   r"|^\.(?:nan|NaN|NAN)$"),
        list("-+0123456789."))
    return yaml.load(text, Loader=Loader)  # noqa: S506 -- a SafeLoader subclass


def _default_at(parts: list[str]) -> Any:
    """The default value at a dotted path of TrainConfig (None when there is none)."""
    cls: Any = TrainConfig
    value: Any = None
    for part in parts:
        if value is None and dataclasses.is_dataclass(cls):
            f = {f.name: f for f in dataclasses.fields(cls)}.get(part)
            if f is None:
                return None
            tp = typing.get_type_hints(cls)[part]
            if dataclasses.is_dataclass(tp):
                cls = tp
                continue
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            cls = None
        elif isinstance(value, dict):
            value = value.get(part)
        else:
            return None
    return value


def set_override(data: dict, assignment: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML/JSON, else kept as a string) to `data`."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not key=value")
    key, raw = assignment.split("=", 1)
    import yaml

    try:
        value = _yaml(raw)
    except yaml.YAMLError:  # not YAML: keep the text
        value = raw
    node = data
    parts = key.strip().split(".")
    for i, part in enumerate(parts[:-1]):
        if part not in node:  # a mapping field keeps its other default entries
            default = _default_at(parts[:i + 1])
            node[part] = dict(default) if isinstance(default, dict) else {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> TrainConfig:
    """TrainConfig from a YAML or JSON file (None: all defaults) plus `a.b=c` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        import yaml

        try:
            data = json.loads(text) if path.suffix == ".json" else _yaml(text) or {}
        except (ValueError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path} is not valid {path.suffix.lstrip('.') or 'YAML'}: "
                              f"{exc}") from exc
    for assignment in overrides:
        set_override(data, assignment)
    return from_dict(TrainConfig, data)
