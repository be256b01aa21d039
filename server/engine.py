"""The serving engine: admission on cost, round-robin batching, and a two-stage pipeline.

Admission (`submit`) prices a job before any compute: its tokens against the
queue budget, and the memory it may hold (input tensors plus at most one
stream buffer of undelivered output) against the memory budget. The scheduler
(`jobs.RoundRobin`) fills forward batches one chunk per stream per round. Each
batch then goes through two stages that overlap across batches:

1. device stage (one thread, the teacher's device): forward pass, then logits a
   few hundred positions at a time and `sparsify`, on the device; results are
   copied to host memory (on CUDA: pinned buffers on a side stream, with an
   event the next stage waits on). Draw coordinates come from `ops.rowkey`,
   computed here from the tokens received.
2. CPU stage (one thread): encode, row keys, cache tee, and hand-off to each
   job's stream, in order; a job's last chunk is followed by DONE.

Each chunk goes to the CPU stage as soon as the device has it (a queue of at most
`pipeline_depth` chunks between the two threads), so encoding overlaps the rest of
the batch and the next batch's forward. Failures are
classified here, never by message text upstream: out-of-memory shrinks the
batch budget and fails the batch's jobs with `OverloadedError`; non-finite
logits or a crashed forward fail them with `TeacherFault` naming the row and
position, and `max_teacher_faults` consecutive faults mark the replica
unhealthy (NOT_SERVING, new requests UNAVAILABLE). It knows nothing about gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from logitcast.cache import CacheNamespace
from logitcast.ops import SparseTargets, sparsify
from logitcast.ops.codec import encode
from logitcast.ops.errors import NonFiniteLogitsError
from logitcast.ops.rowkey import draw_coordinates, next_token_labels, row_key, units
from logitcast.server.backends import TeacherBackend
from logitcast.server.errors import (
    DrainingError,
    OverloadedError,
    TeacherFault,
    is_out_of_memory,
)
from logitcast.server.jobs import SCORE, Job, RoundRobin
from logitcast.server.limits import working_set_bytes
from logitcast.server.metrics import TeacherMetrics
from logitcast.server.tee import CacheTee

logger = logging.getLogger(__name__)

DONE = object()


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Batching, capacity and failure policy of one teacher server."""

    max_batch_tokens: int = 8192
    """Tokens per teacher forward batch (halved after an out-of-memory, down to one row)."""
    max_wait_s: float = 0.002
    """How long a batch waits for more rows when the budget is not yet full."""
    max_queue_tokens: int = 262144
    """Admitted-but-unserved tokens beyond which new requests get RESOURCE_EXHAUSTED."""
    max_queue_bytes: int = 512 << 20
    """Memory budget of admitted requests: their input tensors plus what each may buffer
    of undelivered output. Beyond it new requests get RESOURCE_EXHAUSTED."""
    stream_buffer_bytes: int = 16 << 20
    """Undelivered output one stream may hold (an upper-bound estimate): a slower reader
    pauses its own job, nobody else's."""
    stall_timeout_s: float = 60.0
    """A client that takes no chunk for this long while output waits is cancelled
    (RESOURCE_EXHAUSTED), freeing its buffer."""
    positions_per_chunk: int = 256
    """Positions whose logits exist at once while sparsifying."""
    max_working_set_bytes: int = 2 << 30
    """Requests whose sparsify working set (see `limits.working_set_bytes`) is larger are
    refused with INVALID_ARGUMENT."""
    pipeline_depth: int = 8
    """Chunks done on the device and waiting for the CPU stage (the device stage blocks
    beyond it)."""
    max_teacher_faults: int = 3
    """Consecutive failed batches (NaN/inf logits, crashed forward) after which the replica
    reports NOT_SERVING."""

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_queue_tokens", "max_queue_bytes",
                     "stream_buffer_bytes", "positions_per_chunk", "max_working_set_bytes",
                     "pipeline_depth", "max_teacher_faults"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.max_wait_s <= 1:
            raise ValueError(f"max_wait_s must be in [0, 1], got {self.max_wait_s}")
        if not self.stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {self.stall_timeout_s}")


@dataclass
class _Chunk:
    """Device-stage output for one streamed chunk of a distill job."""

    job: Job
    row_start: int
    rows: int
    targets: SparseTargets  # on host
    tokens: torch.Tensor  # int64 [rows, T] on CPU
    unit_keys: list[bytes]
    ready: torch.cuda.Event | None = None


class Engine:
    """Batches jobs onto one teacher backend through the two-stage pipeline."""

    def __init__(self, backend: TeacherBackend, config: EngineConfig,
                 metrics: TeacherMetrics, tee: CacheTee | None = None) -> None:
        self.backend, self.config, self.metrics, self.tee = backend, config, metrics, tee
        self._rr = RoundRobin()
        self._open: set[Job] = set()
        self._work = asyncio.Event()
        self._device_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-device")
        self._to_cpu: queue.Queue = queue.Queue(maxsize=config.pipeline_depth)
        self._cpu_thread = threading.Thread(target=self._cpu_stage, name="teacher-encode",
                                            daemon=True)
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._faults = 0
        self.unhealthy_reason: str | None = None
        self.on_unhealthy: list[Callable[[str], None]] = []
        self._namespaces: dict[tuple, CacheNamespace] = {}  # CPU stage only
        self.batch_tokens = config.max_batch_tokens
        self.queued_tokens = 0
        self.reserved_bytes = 0
        self._copy_stream = (torch.cuda.Stream(device=backend.device)
                             if backend.device.type == "cuda" else None)
        metrics.batch_budget_tokens.set(self.batch_tokens)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._cpu_thread.start()
        self._tasks = [self._loop.create_task(self._schedule_loop(), name="logitcast-schedule")]

    @property
    def active_jobs(self) -> int:
        return len(self._open)

    def check_health(self) -> None:
        """RuntimeError when the engine cannot serve: a stage task died, or the teacher
        failed `max_teacher_faults` batches in a row."""
        for task in self._tasks:
            if task.done():
                exc = None if task.cancelled() else task.exception()
                raise RuntimeError(f"engine task {task.get_name()} stopped: {exc!r}")
        if self._cpu_thread.ident is not None and not self._cpu_thread.is_alive():
            raise RuntimeError("the engine's CPU stage thread stopped")
        if self.unhealthy_reason:
            raise RuntimeError(self.unhealthy_reason)

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new jobs, wait for admitted ones to finish; True if all finished."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while self._open and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not self._open

    async def close(self) -> None:
        """Stop the stages and the tee without blocking the event loop."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for job in list(self._open):
            self.finish(job)

        def shutdown() -> None:
            self._device_pool.shutdown(wait=True, cancel_futures=True)
            if self._cpu_thread.is_alive():
                self._to_cpu.put(None)
                self._cpu_thread.join()
            if self.tee is not None:
                self.tee.close()

        await asyncio.to_thread(shutdown)

    # ------------------------------------------------------------------ admission

    def submit(self, job: Job) -> None:
        """Admit a job or raise: DrainingError (draining or unhealthy), ValueError (it can
        never fit this server), OverloadedError (the budgets are full right now)."""
        if self._draining:
            raise DrainingError("server is draining; retry on another replica")
        if self.unhealthy_reason:
            raise DrainingError(f"replica unhealthy ({self.unhealthy_reason}); retry elsewhere")
        cfg = self.config
        job.rows_per_chunk = max(1, min(job.rows_per_chunk, self.batch_tokens // job.seq_len))
        if job.spec is not None:
            ws = working_set_bytes(job.spec, self.backend.vocab_size, cfg.positions_per_chunk)
            if ws > cfg.max_working_set_bytes:
                raise ValueError(f"spec {job.spec.key()} needs ~{ws} bytes to sparsify a chunk, "
                                 f"over max_working_set_bytes={cfg.max_working_set_bytes}")
        cost = self._cost_bytes(job)
        if cost > cfg.max_queue_bytes:
            raise ValueError(f"request needs ~{cost} bytes of server memory, over "
                             f"max_queue_bytes={cfg.max_queue_bytes}; send fewer or shorter rows")
        tokens = job.rows * job.seq_len
        if tokens > cfg.max_queue_tokens:
            raise ValueError(f"request has {tokens} tokens, over this server's "
                             f"max_queue_tokens={cfg.max_queue_tokens}; send fewer or shorter rows")
        # rows a slow reader has paused owe the device nothing yet: they do not keep
        # anyone else out (their inputs stay priced in the memory budget)
        paused = sum(j.queued_tokens for j in self._open
                     if not self._rr.runnable(j, cfg.stream_buffer_bytes))
        if self.queued_tokens - paused + tokens > cfg.max_queue_tokens:
            raise OverloadedError(f"queue holds {self.queued_tokens - paused} tokens; {tokens} "
                                  f"more would exceed max_queue_tokens={cfg.max_queue_tokens}")
        if self.reserved_bytes + cost > cfg.max_queue_bytes:
            raise OverloadedError(f"admitted requests hold {self.reserved_bytes} bytes; {cost} "
                                  f"more would exceed max_queue_bytes={cfg.max_queue_bytes}")
        job.reserved_bytes = cost
        self._open.add(job)
        self._rr.add(job)
        self._set_budgets(tokens, cost)
        self._work.set()

    def _cost_bytes(self, job: Job) -> int:
        """Inputs (int64 tensors and the request's int32 bytes) plus the most undelivered
        output the job may hold: one stream buffer, or one chunk when that is larger."""
        inputs = job.rows * job.seq_len * (12 + (12 if job.document_ids is not None else 0))
        out = min(job.rows * job.row_bytes,
                  max(self.config.stream_buffer_bytes, job.rows_per_chunk * job.row_bytes))
        return inputs + out

    def finish(self, job: Job) -> None:
        """The stream is over (done, failed or cancelled): free what the job still holds."""
        if job in self._open:
            self._open.discard(job)
            job.closed = True
            self._set_budgets(-job.queued_tokens, -job.reserved_bytes)
            job.next_row = job.rows
            self._work.set()

    def consumed(self, job: Job, rows: int) -> None:
        """The reader took `rows` rows of results: the job may be scheduled again."""
        job.consumed(rows)
        self._work.set()

    def _set_budgets(self, tokens: int, reserved: int) -> None:
        self.queued_tokens += tokens
        self.reserved_bytes += reserved
        self.metrics.queue_tokens.set(self.queued_tokens)
        self.metrics.reserved_bytes.set(self.reserved_bytes)

    # ------------------------------------------------------------------ event-loop tasks

    async def _schedule_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._work.wait()
            if self.queued_tokens < self.batch_tokens and self.config.max_wait_s:
                await asyncio.sleep(self.config.max_wait_s)
            batch = self._rr.take(self.batch_tokens, self.config.stream_buffer_bytes)
            if not batch:
                self._work.clear()
                continue
            self._set_budgets(-sum(c * j.seq_len for j, _, c in batch), 0)
            await loop.run_in_executor(self._device_pool, self._device_stage, batch)

    # ------------------------------------------------------------------ device stage (thread)

    def _device_stage(self, batch: list[tuple[Job, int, int]]) -> None:
        """Forward, then per job segment sparsify chunk by chunk; every result (or a job's
        failure) goes to the CPU stage as soon as it exists."""
        b, dev, out = self.backend, self.backend.device, self._to_cpu.put
        tokens = torch.cat([j.tokens[s:s + c] for j, s, c in batch])
        docs = None
        if batch[0][0].document_ids is not None:
            docs = torch.cat([j.document_ids[s:s + c] for j, s, c in batch]).to(dev)
        t0 = time.perf_counter()
        try:
            hidden = b.hidden_states(tokens.to(dev), docs)
        except Exception as exc:  # a broken teacher fails these requests, not the server
            err = self._fault(exc, f"teacher forward on {tokens.numel()} tokens failed")
            for job, _, _ in batch:
                out((job, err))
            return
        t1 = time.perf_counter()
        self.metrics.forward_seconds.observe(t1 - t0)
        self.metrics.batch_tokens.observe(tokens.numel())
        offset, faulted = 0, False
        for job, start, count in batch:
            h = hidden[offset:offset + count]
            offset += count
            if job.closed:
                continue
            try:
                if job.kind == SCORE:
                    out((job, (start, count, self._score(h, job.tokens[start:start + count]))))
                else:
                    self._sparsify_rows(job, start, count, h, out)
            except Exception as exc:
                faulted = True
                out((job, self._fault(exc, "sparsify failed")))
        if not faulted:
            self._faults = 0
        self.metrics.sparsify_seconds.observe(time.perf_counter() - t1)

    def _sparsify_rows(self, job: Job, start: int, count: int, hidden: torch.Tensor,
                       out: Callable[[_Chunk], None]) -> None:
        seq, dev, ppc = job.seq_len, hidden.device, self.config.positions_per_chunk
        tok = job.tokens[start:start + count]
        docs = None if job.document_ids is None else job.document_ids[start:start + count]
        labels = next_token_labels(tok, docs)
        for r0 in range(0, count, job.rows_per_chunk):
            if job.closed:
                break
            rn = min(job.rows_per_chunk, count - r0)
            rows = slice(r0, r0 + rn)
            keys, draw, pos = draw_coordinates(tok[rows], None if docs is None else docs[rows])
            draw, pos = draw.to(dev), pos.to(dev)
            lab = labels[rows].reshape(-1).to(dev)
            h = hidden[rows].reshape(rn * seq, -1)
            parts = []
            for p in range(0, rn * seq, ppc):
                logits = self.backend.logits(h[p:p + ppc])
                try:
                    parts.append(sparsify(logits, job.spec, row_keys=draw[p:p + ppc],
                                          positions=pos[p:p + ppc], labels=lab[p:p + ppc],
                                          chunk_size=ppc, entropy="entropy" in job.extras))
                except NonFiniteLogitsError as exc:
                    bad = p + _first_non_finite(logits)
                    self.metrics.faults.labels("nonfinite").inc()
                    raise TeacherFault(
                        f"teacher produced non-finite logits at row {start + r0 + bad // seq}, "
                        f"position {bad % seq} of the request ({exc})") from exc
            targets, ready = self._to_host(SparseTargets.cat(parts))
            out(_Chunk(job, start + r0, rn, targets, tok[rows], keys, ready))

    def _to_host(self, targets: SparseTargets) -> tuple[SparseTargets, torch.cuda.Event | None]:
        """Host copy of device targets: on CUDA into pinned buffers on a side stream, so
        the copy overlaps the next batch; the CPU stage waits on the returned event."""
        if self._copy_stream is None:
            return targets, None
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(targets.device))
        moved = {}
        with torch.cuda.stream(stream):
            for name in ("ids", "weights", "counts", "num_entries", "num_head", "draws",
                         "tail_mass", "entropy", "logprob"):
                src = getattr(targets, name)
                src.record_stream(stream)  # keep the device memory alive until the copy ran
                dst = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=True)
                moved[name] = dst.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
        return SparseTargets(**moved, vocab_size=targets.vocab_size,
                             tail_from_counts=targets.tail_from_counts), event

    def _score(self, hidden: torch.Tensor, tokens: torch.Tensor) -> list[float]:
        """Per-row sum of teacher log p(x_t | x_<t) over t >= 1."""
        rows, seq = tokens.shape
        dev, ppc = hidden.device, self.config.positions_per_chunk
        h = hidden[:, :-1].reshape(rows * (seq - 1), -1)
        labels = tokens[:, 1:].reshape(-1).to(dev)
        logp = torch.cat([
            torch.log_softmax(self.backend.logits(h[p:p + ppc]), dim=1)
            .gather(1, labels[p:p + ppc, None])[:, 0]
            for p in range(0, len(labels), ppc)
        ]) if len(labels) else torch.zeros(0, device=dev)
        if not bool(torch.isfinite(logp).all()):
            bad = int((~torch.isfinite(logp)).nonzero()[0, 0])
            self.metrics.faults.labels("nonfinite").inc()
            raise TeacherFault(f"teacher log-prob is non-finite at row {bad // (seq - 1)}, "
                               f"position {bad % (seq - 1) + 1} of the request")
        return logp.double().view(rows, seq - 1).sum(dim=1).tolist()

    def _fault(self, exc: BaseException, what: str) -> Exception:
        """Classify a compute failure: OOM shrinks the batch budget (retryable); anything
        else counts towards marking the replica unhealthy."""
        if is_out_of_memory(exc):
            self.metrics.faults.labels("oom").inc()
            self.batch_tokens = max(1, self.batch_tokens // 2)
            self.metrics.batch_budget_tokens.set(self.batch_tokens)
            logger.warning("%s: out of memory; batch budget now %d tokens", what, self.batch_tokens)
            return OverloadedError(f"teacher ran out of memory ({what}); batch budget lowered "
                                   f"to {self.batch_tokens} tokens, retry")
        if not isinstance(exc, TeacherFault):
            self.metrics.faults.labels("error").inc()
            logger.error("%s", what, exc_info=exc)
            exc = TeacherFault(f"{what}: {type(exc).__name__}: {exc}")
        self._faults += 1
        if self._faults >= self.config.max_teacher_faults and not self.unhealthy_reason:
            self.unhealthy_reason = f"{self._faults} consecutive teacher faults, last: {exc}"
            logger.error("marking replica unhealthy: %s", self.unhealthy_reason)
            assert self._loop is not None
            for callback in self.on_unhealthy:
                self._loop.call_soon_threadsafe(callback, self.unhealthy_reason)
        return exc

    # ------------------------------------------------------------------ CPU stage (thread)

    def _cpu_stage(self) -> None:
        """The CPU stage's thread: deliver device results in order until None."""
        while (item := self._to_cpu.get()) is not None:
            t0 = time.perf_counter()
            if isinstance(item, _Chunk):
                self._deliver(item)
            else:
                job, result = item
                if not job.closed:
                    self._emit(job, result)
                    if not isinstance(result, BaseException) and result[0] + result[1] >= job.rows:
                        self._emit(job, DONE)
            self.metrics.encode_seconds.observe(time.perf_counter() - t0)

    def _deliver(self, c: _Chunk) -> None:
        job = c.job
        if job.closed:
            return
        if c.ready is not None:
            c.ready.synchronize()
        try:
            payload = encode(c.targets, extras=job.extras)
            if self.tee is not None:
                self._tee(job, c, payload)
            keys = c.unit_keys if job.document_ids is None else [row_key(r) for r in c.tokens]
        except Exception as exc:
            logger.exception("encoding or teeing a chunk failed")
            self._emit(job, TeacherFault(f"encoding rows {c.row_start}+{c.rows} failed: "
                                         f"{type(exc).__name__}: {exc}"))
            return
        self.metrics.tokens.inc(c.rows * job.seq_len)
        self._emit(job, (c.row_start, c.rows, payload, keys))
        if c.row_start + c.rows >= job.rows:
            self._emit(job, DONE)

    def _tee(self, job: Job, c: _Chunk, payload: bytes) -> None:
        """Cache records under the unit keys: one per row, or per document segment."""
        assert self.tee is not None
        b, mode = self.backend, job.document_ids is not None
        namespace = self._namespaces.get((job.spec, mode))
        if namespace is None:
            namespace = self._namespaces[job.spec, mode] = CacheNamespace(
                teacher_id=b.teacher_id, tokenizer_fingerprint=b.tokenizer_fingerprint,
                spec=job.spec, document_mode=mode)
        seq = job.seq_len
        docs = None if job.document_ids is None else job.document_ids[c.row_start:c.row_start + c.rows]
        for (r, s, e), key in zip(units(c.tokens, docs), c.unit_keys):
            part = c.targets[r * seq + s:r * seq + e]
            if docs is None:
                record = payload if c.rows == 1 else encode(part, extras=job.extras)
            else:
                record = encode(part.pad_to(int(part.num_entries.max())), extras=job.extras)
            self.tee.submit(namespace, key, record)

    def _emit(self, job: Job, item: object) -> None:
        assert self._loop is not None
        if isinstance(item, BaseException):
            job.closed = True
        self._loop.call_soon_threadsafe(job.queue.put_nowait, item)


def _first_non_finite(logits: torch.Tensor) -> int:
    """Index of the first position whose logits hold NaN/+inf or no finite value."""
    top = logits.float().amax(dim=1)
    bad = ~torch.isfinite(top) | torch.isnan(logits).any(dim=1)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else 0
