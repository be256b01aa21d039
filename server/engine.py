"""The serving engine: queue, dynamic batching, teacher forward, sparsify, encode.

Admitted requests (`Job`s) wait in a FIFO. A batcher task takes rows from the
front jobs, whole chunks of `rows_per_chunk` at a time, until the token budget
is full or a short wait has passed, and hands the batch to one compute thread
(one teacher per device). That thread runs the forward pass, then for each
chunk of rows computes logits a few hundred positions at a time, sparsifies and
encodes them on the teacher's device, and pushes the bytes to the job's stream
at once. A cancelled job is skipped from then on and its queued tokens freed.

It knows nothing about gRPC: jobs receive `(row_start, row_count, payload,
row_hashes)` tuples, then `DONE`, or an exception.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from logitcast.cache import CacheNamespace, row_key
from logitcast.ops import SparseTargets, TargetSpec, row_positions, sparsify
from logitcast.ops.codec import encode
from logitcast.protos.convert import content_hash, document_segments, signed64
from logitcast.server.backends import TeacherBackend
from logitcast.server.errors import DrainingError, OverloadedError
from logitcast.server.metrics import TeacherMetrics
from logitcast.server.tee import CacheTee

logger = logging.getLogger(__name__)

DONE = object()


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Batching and capacity limits of one teacher server."""

    max_batch_tokens: int = 8192
    """Tokens per teacher forward batch (a single longer row still runs, alone)."""
    max_wait_s: float = 0.002
    """How long a batch waits for more rows when the budget is not yet full."""
    max_queue_tokens: int = 262144
    """Admitted-but-unserved tokens beyond which new requests get RESOURCE_EXHAUSTED."""
    positions_per_chunk: int = 256
    """Positions whose logits exist at once while sparsifying (memory ~ this x V x 40 B)."""

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_queue_tokens", "positions_per_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.max_wait_s <= 1:
            raise ValueError(f"max_wait_s must be in [0, 1], got {self.max_wait_s}")


@dataclass(eq=False)
class Job:
    """One admitted Distill request."""

    tokens: torch.Tensor  # int64 [R, T]
    document_ids: torch.Tensor | None
    row_keys: torch.Tensor  # int64 [R]
    spec: TargetSpec
    extras: tuple[str, ...]
    rows_per_chunk: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    next_row: int = 0  # first row not yet handed to a batch
    rows_sent: int = 0
    cancelled: bool = False

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def queued_tokens(self) -> int:
        return (self.rows - self.next_row) * self.seq_len


class Engine:
    """Batches jobs onto one teacher backend."""

    def __init__(self, backend: TeacherBackend, config: EngineConfig,
                 metrics: TeacherMetrics, tee: CacheTee | None = None) -> None:
        self.backend, self.config, self.metrics, self.tee = backend, config, metrics, tee
        self._jobs: collections.deque[Job] = collections.deque()
        self._work = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher")
        self._task: asyncio.Task | None = None
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.queued_tokens = 0
        self.active_jobs = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._batcher(), name="logitcast-batcher")

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new jobs, wait for admitted ones to finish; True if all finished."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while self.active_jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.active_jobs == 0

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.tee is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.tee.close)

    # ------------------------------------------------------------------ jobs

    def submit(self, job: Job) -> None:
        """Queue a job; DrainingError or OverloadedError if it cannot be admitted."""
        if self._draining:
            raise DrainingError("server is draining; retry on another replica")
        tokens = job.rows * job.seq_len
        if self.queued_tokens + tokens > self.config.max_queue_tokens:
            raise OverloadedError(
                f"queue holds {self.queued_tokens} tokens; {tokens} more would exceed "
                f"max_queue_tokens={self.config.max_queue_tokens}")
        self._jobs.append(job)
        self.active_jobs += 1
        self._set_queued(self.queued_tokens + tokens)
        self._work.set()

    def finish(self, job: Job) -> None:
        """The stream is over (done, failed or cancelled): free what the job still holds."""
        if not job.cancelled:
            job.cancelled = True
            self.active_jobs -= 1
            self._set_queued(self.queued_tokens - job.queued_tokens)
            job.next_row = job.rows

    async def score(self, tokens: torch.Tensor) -> tuple[list[float], list[int]]:
        """Per-row sum of teacher log p(x_t | x_<t) over t >= 1, and the count."""
        if self._draining:
            raise DrainingError("server is draining; retry on another replica")
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._score, tokens)

    def _set_queued(self, value: int) -> None:
        self.queued_tokens = value
        self.metrics.queue_tokens.set(value)

    # ------------------------------------------------------------------ batching

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._work.wait()
            if self.queued_tokens < self.config.max_batch_tokens and self.config.max_wait_s:
                await asyncio.sleep(self.config.max_wait_s)
            batch = self._take_batch()
            if not batch:
                self._work.clear()
                continue
            await loop.run_in_executor(self._pool, self._compute, batch)

    def _take_batch(self) -> list[tuple[Job, int, int]]:
        """(job, first row, row count) segments: one seq_len and attention mode per batch."""
        while self._jobs and (self._jobs[0].cancelled or self._jobs[0].next_row >= self._jobs[0].rows):
            self._jobs.popleft()
        if not self._jobs:
            return []
        head = self._jobs[0]
        kind = (head.seq_len, head.document_ids is not None)
        budget, batch = self.config.max_batch_tokens, []
        for job in list(self._jobs):
            if job.cancelled or (job.seq_len, job.document_ids is not None) != kind:
                continue
            left = job.rows - job.next_row
            fit = max(budget // job.seq_len, 0 if batch else 1)
            take = min(left, fit)
            if take < left:  # whole chunks only, so chunk boundaries never depend on batching
                aligned = take // job.rows_per_chunk * job.rows_per_chunk
                take = aligned if (aligned or batch) else min(left, job.rows_per_chunk)
            if take <= 0:
                break
            batch.append((job, job.next_row, take))
            job.next_row += take
            budget -= take * job.seq_len
            if budget < job.seq_len:
                break
        self._set_queued(self.queued_tokens - sum(c * j.seq_len for j, _, c in batch))
        return batch

    # ------------------------------------------------------------------ compute (worker thread)

    def _compute(self, batch: list[tuple[Job, int, int]]) -> None:
        backend, dev = self.backend, self.backend.device
        tokens = torch.cat([j.tokens[s:s + c] for j, s, c in batch]).to(dev)
        docs = None
        if batch[0][0].document_ids is not None:
            docs = torch.cat([j.document_ids[s:s + c] for j, s, c in batch]).to(dev)
        t0 = time.perf_counter()
        try:
            hidden = backend.hidden_states(tokens, docs)
        except Exception as exc:  # a broken teacher fails these requests, not the server
            logger.exception("teacher forward failed")
            for job, _, _ in batch:
                self._emit(job, exc)
            return
        t1 = time.perf_counter()
        self.metrics.forward_seconds.observe(t1 - t0)
        self.metrics.batch_tokens.observe(tokens.numel())
        offset = 0
        for job, start, count in batch:
            try:
                self._emit_job_rows(job, start, count, hidden[offset:offset + count],
                                    tokens[offset:offset + count])
            except Exception as exc:
                logger.exception("sparsify failed for a request")
                self._emit(job, exc)
            offset += count
        self.metrics.sparsify_seconds.observe(time.perf_counter() - t1)

    def _emit_job_rows(self, job: Job, start: int, count: int, hidden: torch.Tensor,
                       tokens: torch.Tensor) -> None:
        seq = job.seq_len
        labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], dim=1)
        keys, pos = row_positions(job.row_keys[start:start + count].to(tokens.device), seq)
        if job.document_ids is not None:
            keys, pos = _document_coordinates(tokens, job.document_ids[start:start + count])
            docs = job.document_ids[start:start + count].to(tokens.device)
            labels[:, :-1][docs[:, 1:] != docs[:, :-1]] = -1  # next token is another document's
        ppc = self.config.positions_per_chunk
        for r0 in range(0, count, job.rows_per_chunk):
            if job.cancelled:
                return
            rn = min(job.rows_per_chunk, count - r0)
            h = hidden[r0:r0 + rn].reshape(rn * seq, -1)
            span = slice(r0 * seq, (r0 + rn) * seq)
            lab, row_keys, row_pos = labels[r0:r0 + rn].reshape(-1), keys[span], pos[span]
            parts = [
                sparsify(self.backend.logits(h[p:p + ppc]), job.spec, row_keys=row_keys[p:p + ppc],
                         positions=row_pos[p:p + ppc], labels=lab[p:p + ppc], chunk_size=ppc,
                         entropy="entropy" in job.extras)
                for p in range(0, rn * seq, ppc)
            ]
            targets = SparseTargets.cat(parts)
            payload = encode(targets, extras=job.extras)
            if self.tee is not None:
                self._tee(job, targets, tokens[r0:r0 + rn], start + r0, payload if rn == 1 else None)
            self.metrics.tokens.inc(rn * seq)
            hashes = [content_hash(row) for row in tokens[r0:r0 + rn]]
            self._emit(job, (start + r0, rn, payload, hashes))
        if start + count >= job.rows:
            self._emit(job, DONE)

    def _tee(self, job: Job, targets: SparseTargets, tokens: torch.Tensor, first_row: int,
             row_payload: bytes | None) -> None:
        """Cache records: one per row, or per document segment in document mode."""
        assert self.tee is not None
        b = self.backend
        namespace = CacheNamespace(teacher_id=b.teacher_id, tokenizer_fingerprint=b.tokenizer_fingerprint,
                                   spec=job.spec, document_mode=job.document_ids is not None)
        seq = job.seq_len
        if job.document_ids is None:
            for i, row in enumerate(tokens):
                payload = row_payload or encode(targets[i * seq:(i + 1) * seq], extras=job.extras)
                self.tee.submit(namespace, row_key(row), payload)
            return
        docs = job.document_ids[first_row:first_row + len(tokens)]
        for r, s, e in document_segments(docs):
            part = targets[r * seq + s:r * seq + e]
            width = int(part.num_entries.max())
            self.tee.submit(namespace, row_key(tokens[r, s:e]),
                            encode(part.pad_to(width), extras=job.extras))

    def _emit(self, job: Job, item: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(job.queue.put_nowait, item)

    def _score(self, tokens: torch.Tensor) -> tuple[list[float], list[int]]:
        dev = self.backend.device
        rows, seq = tokens.shape
        tokens = tokens.to(dev)
        hidden = self.backend.hidden_states(tokens)[:, :-1].reshape(rows * (seq - 1), -1)
        labels = tokens[:, 1:].reshape(-1)
        ppc = self.config.positions_per_chunk
        logp = torch.cat([
            torch.log_softmax(self.backend.logits(hidden[p:p + ppc]), dim=1)
            .gather(1, labels[p:p + ppc, None])[:, 0]
            for p in range(0, len(labels), ppc)
        ]) if len(labels) else torch.zeros(0, device=dev)
        sums = logp.double().view(rows, seq - 1).sum(dim=1)
        return sums.tolist(), [seq - 1] * rows


def _document_coordinates(tokens: torch.Tensor,
                          document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw coordinates in document mode: each segment's own content hash and the
    position inside the segment, so targets do not depend on the packing."""
    keys = torch.empty(tokens.shape, dtype=torch.int64)
    pos = torch.empty(tokens.shape, dtype=torch.int64)
    for row, s, e in document_segments(document_ids):
        keys[row, s:e] = signed64(content_hash(tokens[row, s:e]))
        pos[row, s:e] = torch.arange(e - s)
    return keys.reshape(-1).to(tokens.device), pos.reshape(-1).to(tokens.device)
