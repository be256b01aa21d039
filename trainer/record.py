"""Teacher-recording mode (PD §3.5, "online logits"): a model training with plain CE
stores the sparse targets of every row it trains on, for smaller students later.

`TargetRecorder` records from the logits the training forward forms anyway: with
the fused loss (the trainer's default) `batch(input_ids)` is passed to
`ops.fused_distill_loss` as `on_logits` and sparsifies each [chunk, V] fp32
chunk of logits before the loss consumes it, so recording adds no LM-head
matmul; with the plain loss, `recorder(hidden, weight, input_ids)` forms the
logits itself a few hundred positions at a time. Either way it runs on the
training thread, before the optimizer step changes the weights, never holds
[tokens x V], and sparsifies exactly as a teacher server does (draw
coordinates from `ops.rowkey.draw_coordinates`, labels from
`next_token_labels`, `ops.sparsify`, one `encode` per row): each record is the
bytes a server holding these weights would tee (CPU matmuls and `sparsify` are
row-wise, so the chunking does not change them). A background thread
encodes and appends the records with a `CacheWriter` and then one line per
micro-batch to the writer's step log (cache/steps.py), which names the
teacher step. Between the two threads is a bounded queue: when it is full the
training step waits (back-pressure, counted in
`logitcast_trainer_record_backpressure_seconds_total`) and after
`queue_timeout_s` raises `RecordingError`; nothing is dropped. A write error
stops recording and is raised by the next call (or `close`).

The namespace is teacher `record:<run>`, the trainer's tokenizer, the spec,
row mode; writer id `record_rank<rank>`, so a resumed run appends to the same
shards and step log. A row recorded again (a later epoch) is appended again
(`put(..., replace=True)`; the open shard is sealed first when it holds the
key) and its step-log entry names the newer step and payload. A kill leaves
readable shards plus at most a torn tail in each file, which the next open
truncates. What this module does not know: the training loop, DeepSpeed,
document mode (refused: the trainer's masked forward is not a server's
per-document forward, so the bytes would differ), object stores (the step log
is appended on local disk).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

import torch

from logitcast.cache import CacheNamespace, CacheWriter, open_storage
from logitcast.cache.steps import StepLogWriter, payload_digest
from logitcast.ops import SparseTargets, TargetSpec, sparsify
from logitcast.ops.codec import EXTRAS, encode
from logitcast.ops.rowkey import draw_coordinates, next_token_labels

logger = logging.getLogger(__name__)

#: teacher_id prefix of a recorded run's namespace: `record:<run name>`.
RECORD_PREFIX = "record:"
_STOP = object()


class RecordingError(RuntimeError):
    """Recording targets failed (writer error, stuck queue); the message says where."""


def record_namespace(run: str, *, tokenizer_fingerprint: str, spec: TargetSpec) -> CacheNamespace:
    """The cache namespace of run `run`'s recorded targets (row mode)."""
    if not run or not isinstance(run, str):
        raise ValueError(f"a recording run needs a name, got {run!r}")
    return CacheNamespace(teacher_id=RECORD_PREFIX + run,
                          tokenizer_fingerprint=tokenizer_fingerprint, spec=spec)


class TargetRecorder:
    """Sparse targets of the rows a model trains on, written to a local target cache.

    Set `recorder.step`, then for each micro-batch either pass `recorder.batch(input_ids,
    device)` to the fused loss as `on_logits` and call its `done()`, or call
    `recorder(hidden, weight, input_ids)`; `close()` drains the queue, seals and raises
    any error. `trainer.objective.student_loss(..., recorder=...)` does either."""

    def __init__(self, root: str | Path, *, run: str, tokenizer_fingerprint: str,
                 spec: TargetSpec, rank: int = 0, extras: tuple[str, ...] = ("logprob",),
                 chunk_size: int = 256, max_queue: int = 8, queue_timeout_s: float = 600.0,
                 shard_bytes: int = 256 << 20, metrics=None) -> None:
        """root: a local cache directory. extras: per-position floats stored with the
        targets ("logprob", "entropy"). chunk_size: positions whose logits exist at once.
        max_queue: micro-batches of targets waiting for the writer. metrics:
        `TrainerMetrics` or None."""
        unknown = set(extras) - set(EXTRAS)
        if unknown:
            raise ValueError(f"record extras {sorted(unknown)} unknown; choose from "
                             f"{sorted(EXTRAS)}")
        if chunk_size < 1 or max_queue < 1 or not queue_timeout_s > 0:
            raise ValueError(f"chunk_size and max_queue must be >= 1 and queue_timeout_s > 0, "
                             f"got {chunk_size}, {max_queue}, {queue_timeout_s}")
        storage = open_storage(root)
        if not storage.is_local:
            raise ValueError(f"recording needs a local cache directory (its step log is "
                             f"appended in place), got {storage.url}; record locally and "
                             f"copy the namespace directory to the object store")
        self.spec, self.extras, self.chunk_size = spec, tuple(extras), chunk_size
        self.queue_timeout_s, self.metrics = queue_timeout_s, metrics
        self.namespace = record_namespace(run, tokenizer_fingerprint=tokenizer_fingerprint,
                                          spec=spec)
        self.writer = CacheWriter(storage, self.namespace, writer_id=f"record_rank{rank}",
                                  shard_bytes=shard_bytes, skip_existing=False)
        self.where = f"{storage.url}/{self.writer.dir}"
        try:
            self.step_log = StepLogWriter(storage.staging_dir(self.writer.dir),
                                          writer_id=self.writer.writer_id, run=run)
        except BaseException:
            self.writer.close()
            raise
        self.step = 0
        self.records = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._error: tuple[int, BaseException] | None = None
        self._reported = self._closed = False
        self._thread = threading.Thread(target=self._write_loop, name="target-recorder",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ training thread

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor,
                 document_ids: torch.Tensor | None = None) -> None:
        """Record one micro-batch, forming its logits here (the plain loss's path).
        hidden: [B*T, d] last hidden states (detached); weight: [V, d] LM head;
        input_ids: int64 [B, T]."""
        sink = self.batch(input_ids, hidden.device, document_ids)
        self._fill(sink, hidden, weight)
        sink.done()

    def batch(self, input_ids: torch.Tensor, device: torch.device | str,
              document_ids: torch.Tensor | None = None) -> RecordedBatch:
        """A micro-batch recorded from the logits a fused loss forms anyway: pass the
        result as `on_logits` to `ops.fused_distill_loss`, then call its `done()`."""
        if document_ids is not None:
            raise RecordingError("recording needs data.mode=rows (document mode is refused)")
        self._raise_error()
        return RecordedBatch(self, input_ids, torch.device(device))

    def targets(self, hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor
                ) -> tuple[list[bytes], SparseTargets]:
        """(row keys, host `SparseTargets` over the B*T positions) of one micro-batch, the
        server's way, without queueing them: logits chunk by chunk as float32."""
        sink = RecordedBatch(self, input_ids, hidden.device)
        self._fill(sink, hidden, weight)
        return sink.keys, SparseTargets.cat(sink.parts)

    @torch.no_grad()
    def _fill(self, sink: RecordedBatch, hidden: torch.Tensor, weight: torch.Tensor) -> None:
        """Feed `sink` the logits of `hidden`, `chunk_size` positions at a time."""
        if hidden.shape[0] != sink.n:
            raise ValueError(f"hidden has {hidden.shape[0]} positions, input_ids {sink.n}")
        for p in range(0, sink.n, self.chunk_size):
            sink(torch.nn.functional.linear(hidden[p:p + self.chunk_size], weight).float(), p)

    def _put(self, item: tuple) -> None:
        t0 = time.perf_counter()
        while True:
            try:
                self._queue.put(item, timeout=0.05)
                break
            except queue.Full:
                self._raise_error()
                if time.perf_counter() - t0 > self.queue_timeout_s:
                    raise RecordingError(
                        f"recording queue full for {self.queue_timeout_s:g} s "
                        f"({self._queue.maxsize} micro-batches waiting): the cache writer "
                        f"of {self.where} is stuck or far slower than training") from None
        waited = time.perf_counter() - t0
        if self.metrics is not None:
            if waited > 1e-4:
                self.metrics.record_backpressure_seconds.inc(waited)
            self.metrics.record_queue.set(self._queue.qsize())

    def _raise_error(self) -> None:
        if self._error is not None and not self._reported:
            self._reported = True
            step, exc = self._error
            raise RecordingError(f"recording targets into {self.where} failed at teacher step "
                                 f"{step}: {type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------------ writer thread

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._error is None:
                try:
                    self._write(*item)
                except BaseException as exc:  # surfaced on the training thread
                    logger.error("recording failed at step %d: %s", item[0], exc)
                    self._error = (item[0], exc)

    def _write(self, step: int, keys: list[bytes], targets: SparseTargets, seq: int) -> None:
        digests, nbytes = [], 0
        for r, key in enumerate(keys):
            payload = encode(targets[r * seq:(r + 1) * seq], extras=self.extras)
            if not self.writer.put(key, payload, replace=True):
                self.writer.seal()  # the open shard holds this row from an earlier step
                self.writer.put(key, payload, replace=True)
            digests.append(payload_digest(payload))
            nbytes += len(payload)
        self.step_log.append(step, keys, digests)
        self.records += len(keys)
        if self.metrics is not None:
            self.metrics.record_records.inc(len(keys))
            self.metrics.record_bytes.inc(nbytes)
            self.metrics.record_queue.set(self._queue.qsize())

    # ------------------------------------------------------------------ end

    def close(self) -> None:
        """Write what is queued, seal the shard, close the step log and release the
        writer id; raises RecordingError if a write failed and was not yet raised."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(_STOP)
            self._thread.join()
        finally:
            try:
                self.writer.close()
            finally:
                self.step_log.close()
        self._raise_error()

    def __enter__(self) -> TargetRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RecordedBatch:
    """One micro-batch's targets, sparsified chunk by chunk from the fp32 logits the fused
    loss hands to `on_logits` (no second LM-head matmul); `done()` queues them for the
    writer. Each chunk must arrive once, in order, covering all B*T positions: a fused
    loss that raises part way never calls `done()`, so nothing half-made is written."""

    def __init__(self, recorder: TargetRecorder, input_ids: torch.Tensor,
                 device: torch.device) -> None:
        self.recorder, self.seq = recorder, input_ids.shape[1]
        self.n = input_ids.numel()
        self.keys, draw, pos = draw_coordinates(input_ids)
        self.draw, self.pos = draw.to(device), pos.to(device)
        self.labels = next_token_labels(input_ids).reshape(-1).to(device)
        self.parts: list[SparseTargets] = []
        self.filled = 0

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, start: int) -> None:
        c, r = logits.shape[0], self.recorder
        if start != self.filled or start + c > self.n:
            raise RecordingError(f"recorded logits for positions {start}..{start + c - 1} "
                                 f"arrived after {self.filled} of {self.n}: chunks must come "
                                 f"once, in order")
        sl = slice(start, start + c)
        self.parts.append(sparsify(logits, r.spec, row_keys=self.draw[sl],
                                   positions=self.pos[sl], labels=self.labels[sl],
                                   chunk_size=r.chunk_size, entropy="entropy" in r.extras)
                          .to("cpu"))
        self.filled += c

    def done(self) -> None:
        """Queue the micro-batch (the training step waits while the queue is full)."""
        if self.filled != self.n:
            raise RecordingError(f"recorded {self.filled} of {self.n} positions: the loss "
                                 f"did not pass every chunk's logits")
        r = self.recorder
        r._raise_error()
        r._put((r.step, self.keys, SparseTargets.cat(self.parts), self.seq))
