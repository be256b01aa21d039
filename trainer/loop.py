"""`Trainer`: one rank of a DeepSpeed distillation run, built from a `TrainConfig`.

Build (process group, corpus, packer, student, AdamW, DeepSpeed engine,
target sources, metrics), maybe resume, then for each step: this rank's rows
(`Packer.batch(step, rank, world)`) with their targets from the source,
gradient accumulation over micro batches, one optimizer step with the
scheduled alpha and LR; every `eval.every` steps a held-out evaluation; every
`save_every` steps a checkpoint. In recording mode (`record`) every training
forward also hands its last hidden state to a `TargetRecorder`. Rank 0 writes `log.jsonl`, shows a tqdm bar
and exports the student at the end. The loss logged for a step is the mean
over ranks and micro batches, so runs with any world size compare directly.

It knows nothing about servers or how targets are made: sources give
`StepTargets` for `PackedBatch`es.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import torch

from logitcast.client.offline import CacheSource
from logitcast.data.packing import Packer
from logitcast.data.shards import TokenCorpus
from logitcast.ops import KDConfig, TargetSpec, alpha_at, lr_at
from logitcast.ops.schedules import ALPHA_SCHEDULES, LR_SCHEDULES
from logitcast.trainer import checkpoint
from logitcast.trainer.config import ConfigError, TrainConfig, schedule
from logitcast.trainer.metrics import TrainerMetrics, write_scrape_target
from logitcast.trainer.objective import DistillObjective, evaluate_batch, summarize
from logitcast.trainer.record import TargetRecorder
from logitcast.trainer.sources import open_source
from logitcast.trainer.students import build_student, num_parameters

logger = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"


def init_distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank): joins the launcher's process group, or makes a 1-rank one."""
    import deepspeed

    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:  # a plain `python` / in-process run: world of one
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), local


class Trainer:
    """One rank of a run; `run()` trains, evaluates, checkpoints and exports."""

    def __init__(self, config: TrainConfig) -> None:
        import deepspeed

        self.config = c = config
        self.rank, self.world, self.local_rank = init_distributed()
        self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available()
                                   else "cpu")
        self.out = Path(c.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        d = c.data
        self.corpus = TokenCorpus(d.train_tokens)
        self.fingerprint = self.corpus.tokenizer_fingerprint
        self.vocab = c.student.vocab_size or self.corpus.vocab_size
        self.packer = Packer(self.corpus, d.packing())
        if d.global_batch % self.world:
            raise ConfigError(f"data.global_batch {d.global_batch} does not split over "
                              f"{self.world} ranks")
        self.rows_per_rank = d.global_batch // self.world
        self.micro = d.micro_batch or self.rows_per_rank
        if self.rows_per_rank % self.micro:
            raise ConfigError(f"data.micro_batch {self.micro} does not divide the "
                              f"{self.rows_per_rank} rows per rank")
        self.accum = self.rows_per_rank // self.micro
        self.bf16 = c.precision == "bf16" or (
            c.precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())

        student = build_student(preset=c.student.preset, path=c.student.path,
                                vocab_size=self.vocab, max_seq_len=c.student.max_seq_len,
                                init_seed=c.student.init_seed)
        if c.student.freeze_embeddings:
            student.get_input_embeddings().weight.requires_grad_(False)
            student.get_output_embeddings().weight.requires_grad_(False)
        self.num_parameters = num_parameters(student)
        ds = self._deepspeed_config()
        self.zero_stage = ds.get("zero_optimization", {}).get("stage", 0)
        lc = c.loss
        self.kd = KDConfig(loss=lc.kd, temperature=lc.temperature, normalize=lc.normalize,
                           beta=lc.beta, seq_len=d.seq_len)
        objective = DistillObjective(student, self.kd, fused=lc.fused, chunk_size=lc.chunk_size,
                                     zero3=self.zero_stage == 3)
        self.optimizer = torch.optim.AdamW(_param_groups(student, c.optim.weight_decay),
                                           lr=0.0, betas=tuple(c.optim.betas), eps=c.optim.eps)
        self.engine, *_ = deepspeed.initialize(model=objective, optimizer=self.optimizer,
                                               config=ds)
        checkpoint.install_safe_loading(self.engine)

        self.metrics = TrainerMetrics()
        self.metrics_port = (self.metrics.serve(c.metrics_port + self.local_rank
                                                if c.metrics_port else 0, c.metrics_host)
                             if c.metrics_port is not None else None)
        self._sd_file = None
        if self.metrics_port is not None and c.metrics_sd_dir:
            host = c.metrics_host
            if host in ("0.0.0.0", "", "::"):
                host = socket.gethostbyname(socket.gethostname())
            self._sd_file = write_scrape_target(c.metrics_sd_dir, f"trainer-{self.rank}",
                                                f"{host}:{self.metrics_port}",
                                                {"rank": str(self.rank)})
        t = c.teacher
        common = {"tokenizer_fingerprint": self.fingerprint, "vocab_size": self.vocab,
                  "document_mode": d.mode == "documents", "addresses": t.addresses,
                  "cache_dir": t.cache_dir, "cache_on_corrupt": t.cache_on_corrupt,
                  "teacher_id": t.teacher_id,
                  "auth_token": t.auth_token, "allow_insecure_auth": t.allow_insecure_auth,
                  "application": t.application,
                  "rank": self.rank, "device": str(self.device)}
        self.source = open_source(t.source, spec=t.target_spec(), stored_spec=t.stored_target_spec(),
                                  write_cache=t.write_cache, prefetch=t.prefetch,
                                  metrics=self.metrics.client, steps=t.steps, **common)
        self.eval_rows = self._eval_rows(common)
        self.start_step = self._maybe_resume()
        self.recorder = self._recorder()

    # ------------------------------------------------------------------ build helpers

    def _deepspeed_config(self) -> dict:
        c = self.config
        ds = c.deepspeed_config()
        ours = {"train_batch_size": c.data.global_batch,
                "train_micro_batch_size_per_gpu": self.micro,
                "gradient_accumulation_steps": self.accum,
                "gradient_clipping": c.optim.grad_clip}
        for key, value in ours.items():
            if key in ds and ds[key] != value:
                raise ConfigError(f"deepspeed.{key}={ds[key]} contradicts {value} from the "
                                  f"data/optim sections; leave it out of the DeepSpeed config")
            ds[key] = value
        for key in ("bf16", "fp16"):
            if key in ds:
                raise ConfigError(f"deepspeed.{key} is set by precision ({c.precision}); "
                                  f"leave it out of the DeepSpeed config")
        ds["bf16"] = {"enabled": self.bf16}
        ds.setdefault("steps_per_print", 1 << 30)
        return ds

    def _recorder(self) -> TargetRecorder | None:
        """Recording mode: a TargetRecorder fed by every training forward."""
        r = self.config.record
        if not r.enabled:
            return None
        recorder = TargetRecorder(r.cache_dir, run=r.run or self.out.resolve().name,
                                  tokenizer_fingerprint=self.fingerprint,
                                  spec=r.target_spec(), rank=self.rank, extras=tuple(r.extras),
                                  chunk_size=r.chunk_size, max_queue=r.max_queue,
                                  queue_timeout_s=r.queue_timeout_s, shard_bytes=r.shard_bytes,
                                  metrics=self.metrics)
        self.engine.module.recorder = recorder
        return recorder

    def _eval_rows(self, common: dict):
        """[(batch, targets or None)] of this rank's held-out rows, fetched once."""
        e, d = self.config.eval, self.config.data
        if not e.every or d.eval_tokens is None:
            return []
        if e.rows % self.world:
            raise ConfigError(f"eval.rows {e.rows} does not split over {self.world} ranks")
        corpus = TokenCorpus(d.eval_tokens, tokenizer_fingerprint=self.fingerprint)
        packer = Packer(corpus, d.packing(global_batch=e.rows))
        batch = packer.batch(0, self.rank, self.world)
        kind = self.config.teacher.source if e.source == "same" else e.source
        spec = TargetSpec.from_dict(e.spec)
        source = open_source(kind, spec=spec, stored_spec=spec, prefetch=1,
                             extras=("logprob", "entropy"),
                             **common)
        if source is None:
            return [(batch, None)]
        try:
            return [(batch, source.fetch(batch).targets)]
        finally:
            source.close()

    def _maybe_resume(self) -> int:
        c = self.config
        if not c.resume or checkpoint.latest_step(self.ckpt_dir) is None:
            if self.rank == 0:
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / LOG_NAME).write_text("")
                (self.out / "config.json").write_text(json.dumps(c.to_dict(), indent=1))
            return 0
        state = checkpoint.load(self.engine, self.ckpt_dir)
        step = int(state["step"])
        saved = state.get("config", {})
        for section in ("data", "teacher", "loss", "student"):
            if saved.get(section) != c.to_dict()[section]:
                logger.warning("resuming from step %d with a different %s section than the "
                               "checkpoint's", step, section)
        if self.rank == 0:
            _truncate_log(self.out / LOG_NAME, step)
        logger.info("resumed from %s at step %d", self.ckpt_dir, step)
        return step

    # ------------------------------------------------------------------ run

    def run(self) -> dict:
        """Train to `steps`; returns the final evaluation (empty without eval rows)."""
        from tqdm import tqdm

        c = self.config
        steps, every = c.steps, c.eval.every
        stop = c.stop_at or steps
        t_len = c.data.seq_len
        batches = (self.packer.batch(s, self.rank, self.world) for s in
                   range(self.start_step, stop))
        items = self.source.stream(batches) if self.source is not None else \
            ((b, None) for b in batches)
        bar = tqdm(total=steps, initial=self.start_step, unit="step",
                   disable=not c.progress or self.rank != 0, desc=Path(c.output_dir).name)
        final: dict = {}
        if self.start_step == 0 and every:
            final = self.evaluate(0)
        step = self.start_step
        t_wait = time.perf_counter()
        for item in items:
            batch, targets = (item.batch, item.targets) if self.source is not None else item
            wait = time.perf_counter() - t_wait
            record = self._train_step(step, batch, targets, wait, t_len)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if every and (step % every == 0 or step == steps):
                final = self.evaluate(step)
            if step == stop or (c.save_every and step % c.save_every == 0):
                checkpoint.save(self.engine, self.ckpt_dir, step, keep=c.keep_checkpoints,
                                client_state={"config": c.to_dict()})
            t_wait = time.perf_counter()
        bar.close()
        if isinstance(self.source, CacheSource) and self.source.served_steps:
            self._log_teacher_steps(step)
        if c.export and step == steps:
            self.export(self.out / "student")
        return final

    def _log_teacher_steps(self, step: int) -> None:
        """Which recorded teacher steps this rank's targets came from (cache source on a
        namespace recorded during teacher training): a `teacher_steps` log record."""
        served = self.source.served_steps
        known = sorted((k, n) for k, n in served.items() if k is not None)
        half, seen, median = sum(n for _, n in known) / 2, 0, None
        for k, n in known:
            seen += n
            if median is None and seen >= half:
                median = k
        record = {"kind": "teacher_steps", "step": step, "units": sum(served.values()),
                  "unknown": served[None], "min": known[0][0] if known else None,
                  "median": median, "max": known[-1][0] if known else None,
                  "window": list(self.source.steps) if self.source.steps else None}
        self._log(record)
        if self.rank == 0:
            logger.info("targets served from teacher steps %s", record)

    def _train_step(self, step: int, batch, targets, wait: float, t_len: int) -> dict:
        c = self.config
        t0 = time.perf_counter() - wait
        name, params = schedule(c.loss.alpha, c.steps, ALPHA_SCHEDULES)
        alpha = 0.0 if targets is None else alpha_at(step, name, **params)
        name, params = schedule(c.optim.lr, c.steps, LR_SCHEDULES)
        lr = lr_at(step, name, **params)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(3, dtype=torch.float64)
        if self.recorder is not None:
            self.recorder.step = step
        for i in range(self.accum):
            rows = slice(i * self.micro, (i + 1) * self.micro)
            part = None if targets is None else \
                targets[i * self.micro * t_len:(i + 1) * self.micro * t_len].to(self.device)
            docs = None if batch.document_ids is None else batch.document_ids[rows].to(self.device)
            total, parts = self.engine(batch.input_ids[rows].to(self.device),
                                       batch.labels[rows].to(self.device), part, alpha, docs)
            self.engine.backward(total)
            self.engine.step()
            sums += torch.tensor([float(total.detach()), float(parts["lm"]), float(parts.get("kd", 0.0))],
                                 dtype=torch.float64)
        sums /= self.accum * self.world
        torch.distributed.all_reduce(sums)
        seconds = time.perf_counter() - t0
        tokens = self.rows_per_rank * t_len
        m = self.metrics
        m.tokens.inc(tokens)
        m.steps.inc()
        m.step.set(step + 1)
        m.step_seconds.inc(seconds)
        m.tokens_per_second.set(tokens / seconds)
        for name, value in zip(("total", "lm", "kd"), sums.tolist()):
            m.loss.labels(name).set(value)
        m.alpha.set(alpha)
        m.lr.set(lr)
        record = {"kind": "train", "step": step, "loss": sums[0].item(), "lm": sums[1].item(),
                  "kd": sums[2].item(), "alpha": alpha, "lr": lr,
                  "tokens_per_s": tokens * self.world / seconds, "wait_s": wait,
                  "rows": [k.hex() for k in batch.row_keys]}
        self._log(record)
        return record

    def evaluate(self, step: int) -> dict:
        """Held-out metrics after `step` steps (collective over ranks)."""
        if not self.eval_rows:
            return {}
        student = self.engine.module.student
        sums = None
        for batch, targets in self.eval_rows:
            t_len = batch.input_ids.shape[1]
            for i in range(0, batch.input_ids.shape[0], self.micro):
                rows = slice(i, i + self.micro)
                part = None if targets is None else targets[
                    i * t_len:(i + self.micro) * t_len].to(self.device)
                docs = None if batch.document_ids is None else \
                    batch.document_ids[rows].to(self.device)
                s = evaluate_batch(student, batch.input_ids[rows].to(self.device),
                                   batch.labels[rows].to(self.device), part, document_ids=docs)
                sums = s if sums is None else {k: sums[k] + s[k] for k in s}
        for key in sorted(sums):
            torch.distributed.all_reduce(sums[key])
        result = summarize(sums)
        for name, value in result.items():
            if value is not None:
                self.metrics.eval.labels(name).set(value)
        self._log({"kind": "eval", "step": step, **result})
        if self.rank == 0:
            logger.info("eval after step %d: %s", step, {k: round(v, 4) for k, v in
                                                          result.items() if v is not None})
        return result

    def export(self, directory: Path) -> None:
        """save_pretrained the student (safetensors) on rank 0; gathers ZeRO-3 shards."""
        student = self.engine.module.student
        if self.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
            state = {k.removeprefix("student."): v for k, v in state.items()} if state else None
        else:
            state = student.state_dict()
        if self.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            student.save_pretrained(directory, state_dict=state)
            if self.config.export_tokenizer:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(self.config.export_tokenizer).save_pretrained(
                    directory)
            t = self.config.teacher
            (directory / "logitcast.json").write_text(json.dumps({
                "tokenizer_fingerprint": self.fingerprint, "teacher_source": t.source,
                "teacher_id": t.teacher_id, "spec": t.spec, "steps": self.config.steps,
                "parameters": self.num_parameters}, indent=1))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / LOG_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        """Close the target source and the recorder (raising a recording error not yet
        raised: records still queued are written first)."""
        try:
            if self.recorder is not None:
                self.engine.module.recorder = None
                self.recorder.close()
        finally:
            if self.source is not None:
                self.source.close()
            if self._sd_file is not None:  # a finished rank is gone, not down
                self._sd_file.unlink(missing_ok=True)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on norms and biases (each tensor once)."""
    seen, decay, rest = set(), [], []
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0}]


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log records of steps before `step` (and evals up to it), atomically."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a crash
        if r.get("step", 0) < step or (r.get("kind") == "eval" and r.get("step") == step):
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep))
    os.replace(tmp, path)


def read_log(output_dir: str | Path) -> list[dict]:
    """The records of a run's log.jsonl."""
    path = Path(output_dir) / LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
