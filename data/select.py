"""MiniPLM difference sampling: keep the instances the teacher likes far more than a small model.

An instance is a packed row (the trainer's `Packer`, epoch 0 of `seed`; the paper's
fixed-length instances) or a whole document. Its score is
    (log p_teacher(x) - log p_reference(x)) / n,
log p being the sum of log p(x_t | x_<t) over every token but the first and n the
tokens scored: per token (for rows, where n is the same for all, this ranks exactly
like the paper's plain difference). When teacher and reference tokenize differently
(or differently from the corpus), both score the same *text*: the instance decoded
with the corpus's tokenizer and re-encoded by each side's, and n is its UTF-8 bytes.
Sequences longer than `seq_len` are scored in pieces of at most `seq_len` tokens that
overlap by one token, so every token but the first is scored exactly once (with the
context of its own piece). A seeded uniform `reference_split` of the instances is
reserved for training the reference and never scored nor selected.

Scores come from any `Scorer` (the fleet's `client.scorer.TeacherScorer`, or
`ModelScorer` over a local causal LM) and go to a `scores.ScoreLog` as they arrive,
so a killed run resumes where it stopped and another ratio is selected from
`columns.npy` with no scoring. The selection is an ordinary token corpus
(`shards.ShardWriter`) plus `selection.json`, built in a temporary sibling and renamed
into place: the output appears whole or not at all. This module loads no model or
tokenizer (it is handed them) and knows no gRPC.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from logitcast.data.packing import Packer, PackingConfig
from logitcast.data.scores import PLAN, ScoreFileError, ScoreLog
from logitcast.data.shards import MANIFEST, ShardWriter, TokenCorpus

logger = logging.getLogger(__name__)

UNITS = ("rows", "documents")
SIDES = ("teacher", "reference")
COLUMNS = "columns.npy"  # float64 [instances, 3]: score, teacher and reference log-prob per unit
SELECTION = "selection.json"


class SelectError(ValueError):
    """Selection input that cannot work: a ratio, corpus, model or output path."""


@dataclass(frozen=True, kw_only=True)
class SelectConfig:
    """What to score and how much to keep."""

    ratio: float = 0.5
    """Fraction of the candidate instances kept, in (0, 1]."""
    unit: str = "rows"
    """'rows' (packed rows of seq_len tokens, as the paper) or 'documents'."""
    seq_len: int = 512
    """Rows: tokens per row. Documents: the longest piece scored in one request."""
    seed: int = 0
    """Packing seed of the rows and seed of the reference split."""
    reference_split: float = 0.0
    """Fraction of the instances reserved for training the reference, in [0, 1)."""
    batch_tokens: int = 16384
    """Tokens per scoring request (fewer when a scorer's limits are lower)."""

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise SelectError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.unit not in UNITS:
            raise SelectError(f"unit must be one of {list(UNITS)}, got {self.unit!r}")
        if self.seq_len < 2 or self.batch_tokens < self.seq_len:
            raise SelectError(f"seq_len must be >= 2 and batch_tokens >= seq_len, got "
                              f"{self.seq_len}, {self.batch_tokens}")
        if not 0 <= self.reference_split < 1:
            raise SelectError(f"reference_split must be in [0, 1), got {self.reference_split}")


class Scorer(Protocol):
    """Something that gives sum_t log p(x_t | x_<t), t = 1..T-1, for rows of tokens."""

    name: str
    tokenizer_fingerprint: str
    vocab_size: int
    max_rows: int
    max_tokens: int
    max_seq_len: int

    def score_batches(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """For each int array [R, T] (T >= 2) in order: float64 [R] sums."""


class ModelScorer:
    """A local causal LM (Hugging Face, with a `.model` trunk and an output embedding),
    scored exactly as the server's Score: float32 log-softmax, float64 row sums."""

    max_rows, max_tokens = 1 << 20, 1 << 30

    def __init__(self, model: Any, *, name: str, tokenizer_fingerprint: str,
                 device: str | torch.device = "cpu", chunk_positions: int = 1024) -> None:
        if not hasattr(model, "model") or model.get_output_embeddings() is None:
            raise SelectError(f"{name}: {type(model).__name__} has no .model trunk and LM head")
        self.model = model.to(device).eval().requires_grad_(False)
        self.name, self.tokenizer_fingerprint = name, tokenizer_fingerprint
        self.device, self.chunk = torch.device(device), chunk_positions
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_seq_len = int(getattr(model.config, "max_position_embeddings", 2048))

    @torch.inference_mode()
    def score(self, rows: np.ndarray) -> np.ndarray:
        """float64 [R] sums of log p(x_t | x_<t), t >= 1, of rows: int [R, T]."""
        ids = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.device)
        hidden = self.model.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        h, labels = hidden.reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1)
        head = self.model.get_output_embeddings()
        logp = torch.cat([torch.log_softmax(head(h[p:p + self.chunk]).float(), dim=1)
                          .gather(1, labels[p:p + self.chunk, None])[:, 0]
                          for p in range(0, labels.numel(), self.chunk)])
        return logp.double().view(ids.shape[0], -1).sum(1).cpu().numpy()

    def score_batches(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for rows in batches:
            yield self.score(rows)


# ---------------------------------------------------------------------------- instances


class Instances:
    """The corpus's units of selection: packed rows (epoch 0 of `seed`) or documents."""

    def __init__(self, corpus: TokenCorpus, config: SelectConfig) -> None:
        self.corpus, self.unit = corpus, config.unit
        if corpus.num_documents == 0:
            raise SelectError(f"corpus {corpus.directory} has no documents")
        if config.unit == "rows":
            try:
                self._packer = Packer(corpus, PackingConfig(seq_len=config.seq_len,
                                                            global_batch=1, seed=config.seed))
            except ValueError as exc:
                raise SelectError(f"corpus {corpus.directory}: {exc}") from exc
            self.count = self._packer.rows_per_epoch
        else:
            self.count = corpus.num_documents

    def tokens(self, i: int) -> np.ndarray:
        """int64 token ids of instance i (a row holds EOS between documents)."""
        if self.unit == "rows":
            return self._packer.row(int(i))[0].numpy()
        return self.corpus.document(int(i))

    def documents(self, i: int) -> list[np.ndarray]:
        """Instance i as documents of the output corpus: a row is cut at its EOS tokens
        (packing adds them back), a document is itself."""
        tokens = self.tokens(i)
        if self.unit == "documents":
            return [tokens]
        eos = self.corpus.eos_id
        parts = np.split(tokens, np.flatnonzero(tokens == eos))
        return [q for q in (p[p != eos] for p in parts) if q.size]


def reference_split(count: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted int64 indices of the round(fraction * count) instances reserved for the
    reference: a seeded uniform sample, the same for every run with the same seed."""
    k = round(fraction * count)
    return np.sort(np.random.default_rng([seed, 0x5E1EC7]).permutation(count)[:k])


@dataclass(frozen=True)
class Pieces:
    """One side's scoring pieces: piece p is tokens [start, start + length) of `instance`."""

    instance: np.ndarray
    start: np.ndarray
    length: np.ndarray

    @classmethod
    def of(cls, candidates: np.ndarray, lengths: np.ndarray, seq_len: int) -> Pieces:
        """Pieces of at most seq_len tokens overlapping by one (lengths: per candidate)."""
        n = np.where(lengths < 2, 0, -(-(lengths - 1) // (seq_len - 1)))
        inst = np.repeat(candidates, n)
        j = np.arange(inst.size) - np.repeat(np.cumsum(n) - n, n)
        start = j * (seq_len - 1)
        return cls(inst, start, np.minimum(seq_len, np.repeat(lengths, n) - start))


# ---------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Scores:
    """Per-instance results: float64 [instances] each, NaN outside the candidates."""

    score: np.ndarray
    """(teacher - reference) log-prob per unit: the selection key"""
    teacher: np.ndarray
    """teacher log-prob per unit (token or byte)"""
    reference: np.ndarray
    """reference log-prob per unit"""
    plan: dict
    """the ScoreLog plan: corpus, unit, models, normalisation, ..."""

    @property
    def candidates(self) -> np.ndarray:
        return np.flatnonzero(np.isfinite(self.score))

    @property
    def split(self) -> np.ndarray:
        return reference_split(self.plan["instances"], self.plan["reference_split"],
                               self.plan["seed"])

    @classmethod
    def load(cls, directory: str | Path, corpus: TokenCorpus, config: SelectConfig) -> Scores:
        """The finished scores in `directory` (no scoring), after checking they were made
        for this corpus and config; SelectError when absent or another plan's."""
        directory = Path(directory)
        if not (directory / COLUMNS).is_file():
            raise SelectError(f"{directory} holds no finished scores ({COLUMNS} missing)")
        try:
            plan = json.loads((directory / PLAN).read_text())
            cols = np.load(directory / COLUMNS, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ScoreFileError(f"{directory}: unreadable scores ({exc})") from exc
        want = _plan_base(corpus, config)
        diff = sorted(k for k in want if plan.get(k) != want[k])
        if diff:
            raise SelectError(f"{directory} scored another corpus or config (differs in {diff})")
        if cols.ndim != 2 or cols.shape != (plan["instances"], 3):
            raise ScoreFileError(f"{directory / COLUMNS}: shape {cols.shape}, expected "
                                 f"({plan['instances']}, 3)")
        return cls(cols[:, 0].copy(), cols[:, 1].copy(), cols[:, 2].copy(), plan)


def _plan_base(corpus: TokenCorpus, config: SelectConfig) -> dict:
    manifest = (corpus.directory / MANIFEST).read_bytes()
    return {"corpus": {"directory": str(corpus.directory.resolve()),
                       "manifest_blake2b": hashlib.blake2b(manifest, digest_size=16).hexdigest(),
                       "documents": corpus.num_documents, "tokens": corpus.num_tokens},
            "unit": config.unit, "seq_len": config.seq_len, "seed": config.seed,
            "reference_split": config.reference_split}


def score_corpus(corpus: TokenCorpus, config: SelectConfig, scorers: dict[str, Scorer],
                 scores_dir: str | Path, *, tokenizers: dict[str, Any] | None = None,
                 progress: bool = True) -> Scores:
    """Score every candidate instance with scorers["teacher"] and scorers["reference"],
    resuming from (and appending to) the ScoreLog in `scores_dir`.

    tokenizers: needed only when the two sides (or a side and the corpus) tokenize
    differently: "corpus" (decodes the corpus) and one per side, HF-style objects
    (`decode(ids, skip_special_tokens=True)`, `tok(text, add_special_tokens=False)`).
    """
    instances = Instances(corpus, config)
    fps = {side: scorers[side].tokenizer_fingerprint for side in SIDES}
    by_token = fps["teacher"] == fps["reference"] == corpus.tokenizer_fingerprint
    split = reference_split(instances.count, config.reference_split, config.seed)
    candidates = np.setdiff1d(np.arange(instances.count), split)
    for side in SIDES:
        s = scorers[side]
        if by_token and s.vocab_size != corpus.vocab_size:
            raise SelectError(f"the {side} ({s.name}) has a vocabulary of {s.vocab_size} "
                              f"tokens, the corpus {corpus.vocab_size}, with the same "
                              f"tokenizer fingerprint {fps[side]}: not the same tokenizer")
        if config.seq_len > s.max_seq_len:
            raise SelectError(f"seq_len {config.seq_len} exceeds the {side}'s ({s.name}) "
                              f"max_seq_len {s.max_seq_len}")
    if by_token:
        units = np.full(instances.count, float(config.seq_len - 1)) if config.unit == "rows" \
            else np.maximum(corpus.lengths - 1, 0).astype(np.float64)
        seqs = dict.fromkeys(SIDES, instances.tokens)
        lengths = {side: (np.full(candidates.size, config.seq_len) if config.unit == "rows"
                          else corpus.lengths[candidates]) for side in SIDES}
    else:
        units, seqs, lengths = _retokenize(instances, candidates, scorers, tokenizers, fps)
    pieces = {side: Pieces.of(candidates, lengths[side], config.seq_len) for side in SIDES}
    plan = {**_plan_base(corpus, config), "instances": instances.count,
            "normalisation": "token" if by_token else "byte",
            "sides": {side: {"model": scorers[side].name, "tokenizer_fingerprint": fps[side],
                             "pieces": int(pieces[side].instance.size)} for side in SIDES}}
    with ScoreLog(scores_dir, plan) as log:
        for side in SIDES:
            _score_side(log, side, scorers[side], pieces[side], seqs[side], config, progress)
        per_unit = {}
        for side in SIDES:
            total = np.bincount(pieces[side].instance, weights=log.sums[side],
                                minlength=instances.count)
            scored = np.zeros(instances.count, bool)
            scored[pieces[side].instance] = True
            per_unit[side] = np.where(scored & (units > 0), total / np.maximum(units, 1), np.nan)
        result = Scores(per_unit["teacher"] - per_unit["reference"], per_unit["teacher"],
                        per_unit["reference"], log.plan)
        cols = np.stack([result.score, result.teacher, result.reference], axis=1)
        tmp = Path(scores_dir) / f".{COLUMNS}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, cols, allow_pickle=False)
        os.replace(tmp, Path(scores_dir) / COLUMNS)
    return result


def _retokenize(instances: Instances, candidates: np.ndarray, scorers: dict[str, Scorer],
                tokenizers: dict[str, Any] | None, fps: dict[str, str]):
    """(bytes per instance, side -> tokens of instance, side -> lengths of candidates):
    each candidate decoded once with the corpus tokenizer, re-encoded by each side."""
    tokenizers = tokenizers or {}
    missing = [k for k in ("corpus", *SIDES) if tokenizers.get(k) is None]
    if missing:
        raise SelectError(
            f"teacher ({fps['teacher']}), reference ({fps['reference']}) and corpus "
            f"({instances.corpus.tokenizer_fingerprint}) tokenizers differ, so both sides must "
            f"score the same text, which needs the tokenizers of: {', '.join(missing)} "
            f"(--tokenizer for the corpus, --reference-tokenizer / --teacher-tokenizer)")
    units = np.zeros(instances.count)
    seqs: dict[str, dict[int, np.ndarray]] = {side: {} for side in SIDES}
    for i in tqdm(candidates.tolist(), desc="re-tokenize", unit="inst", disable=len(candidates) < 1000):
        text = tokenizers["corpus"].decode(instances.tokens(i).tolist(), skip_special_tokens=True)
        units[i] = len(text.encode("utf-8"))
        for side in SIDES:
            ids = np.asarray(tokenizers[side](text, add_special_tokens=False)["input_ids"],
                             dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= scorers[side].vocab_size):
                raise SelectError(f"the {side} tokenizer gives ids outside the {side}'s "
                                  f"vocabulary of {scorers[side].vocab_size}")
            seqs[side][i] = ids
    lengths = {side: np.array([seqs[side][i].size for i in candidates.tolist()], np.int64)
               for side in SIDES}
    return units, {side: seqs[side].__getitem__ for side in SIDES}, lengths


def _score_side(log: ScoreLog, side: str, scorer: Scorer, pieces: Pieces,
                seq_of: Callable[[int], np.ndarray], config: SelectConfig,
                progress: bool) -> None:
    """Score `side`'s missing pieces in batches of equal length, logging each batch."""
    todo = log.missing(side)
    if not todo.size:
        return
    lengths = pieces.length[todo]
    batches = []
    for n in np.unique(lengths):
        ids = todo[lengths == n]
        per = max(1, min(scorer.max_rows, config.batch_tokens // n, scorer.max_tokens // n))
        batches += [ids[i:i + per] for i in range(0, ids.size, per)]

    def rows(ids: np.ndarray) -> np.ndarray:
        return np.stack([seq_of(pieces.instance[p])[pieces.start[p]:pieces.start[p] +
                                                    pieces.length[p]] for p in ids])

    bar = tqdm(total=int(lengths.sum()), desc=f"score {side} ({scorer.name})", unit="tok",
               disable=not progress)
    try:
        for ids, sums in zip(batches, scorer.score_batches(rows(b) for b in batches)):
            log.append(side, ids, sums)
            bar.update(int(pieces.length[ids].sum()))
    finally:
        bar.close()


# ---------------------------------------------------------------------------- selection


def top_fraction(scores: Scores, ratio: float) -> np.ndarray:
    """Sorted indices of the round(ratio * candidates) best-scoring candidates (at least
    one; ties broken by index)."""
    if not 0 < ratio <= 1:
        raise SelectError(f"ratio must be in (0, 1], got {ratio}")
    cand = scores.candidates
    if cand.size == 0:
        raise SelectError("no instance could be scored (every one is reserved for the "
                          "reference or shorter than 2 tokens)")
    k = min(cand.size, max(1, round(ratio * cand.size)))
    order = np.lexsort((cand, -scores.score[cand]))
    return np.sort(cand[order[:k]])


def check_out(out: str | Path) -> Path:
    """`out` as a Path, if it does not exist yet (SelectError otherwise)."""
    out = Path(out)
    if out.exists():
        raise SelectError(f"--out {out} already exists; choose a new directory")
    return out


def write_corpus(instances: Instances, chosen: np.ndarray, out: str | Path, info: dict) -> Path:
    """The `chosen` instances as a token corpus at `out` (+ `info` as selection.json),
    built in a temporary sibling and renamed: `out` appears whole or not at all."""
    out = check_out(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        c = instances.corpus
        writer = ShardWriter(tmp, c.tokenizer_fingerprint, c.vocab_size, c.eos_id)
        for n, i in enumerate(chosen.tolist(), 1):
            for doc in instances.documents(i):
                writer.add(doc)
            if n % 1024 == 0 or n == chosen.size:
                writer.commit_source(f"instances <= {i}")
        writer.flush()
        (tmp / SELECTION).write_text(json.dumps(info, indent=1))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def selection_info(scores: Scores, config: SelectConfig, kept: np.ndarray,
                   instances: Instances) -> dict:
    """The output's selection.json: who scored, how, and what was kept."""
    plan, split = scores.plan, scores.split
    per = {"token": "per token (teacher and reference share the corpus's tokenizer)",
           "byte": "per UTF-8 byte (the tokenizers differ: both scored the same decoded "
                   "text, re-encoded by each)"}[plan["normalisation"]]
    return {"format": "logitcast-selection", "version": 1, "method": "MiniPLM difference "
            "sampling: top ratio by (log p_teacher - log p_reference) / n",
            "teacher": plan["sides"]["teacher"], "reference": plan["sides"]["reference"],
            "ratio": config.ratio, "unit": config.unit, "seq_len": config.seq_len,
            "seed": config.seed, "normalisation": plan["normalisation"],
            "normalisation_note": per, "source_corpus": plan["corpus"],
            "counts": {"instances": plan["instances"], "reference_split": int(split.size),
                       "candidates": int(scores.candidates.size),
                       "unscorable": int(plan["instances"] - split.size -
                                         scores.candidates.size),
                       "kept": int(kept.size),
                       "kept_tokens": int(sum(instances.tokens(i).size for i in kept))},
            "score_threshold": float(scores.score[kept].min()),
            "reference_split": {"fraction": config.reference_split, "seed": config.seed,
                                "instances": split.tolist()}}
