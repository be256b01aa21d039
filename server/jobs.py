"""Admitted requests (`Job`s) and the round-robin scheduler that batches their rows.

A job's rows are cut into chunks of `rows_per_chunk` rows from its first row, so
chunk boundaries (and the bytes of every streamed chunk) never depend on how
rows were batched. The scheduler fills a forward batch one chunk per stream per
round, starting each batch at the next stream in turn: a stream with a huge
request gets one chunk per round like everyone else instead of starving them.
A stream whose undelivered output (scheduled but not yet read by its client)
would pass the per-stream buffer is skipped until its reader catches up: a slow
reader pauses only its own job.

It knows nothing about gRPC, devices or encoding; the engine drives it from the
event loop thread only.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field

import torch

from logitcast.ops.spec import TargetSpec

DISTILL, SCORE = "distill", "score"


@dataclass(eq=False)
class Job:
    """One admitted Distill or Score request."""

    kind: str
    """DISTILL or SCORE."""
    tokens: torch.Tensor
    """int64 [R, T] on CPU."""
    document_ids: torch.Tensor | None = None
    """int64 [R, T] (document mode) or None."""
    spec: TargetSpec | None = None
    """Distill only."""
    extras: tuple[str, ...] = ()
    rows_per_chunk: int = 1
    """Rows per streamed chunk (the engine may lower it to fit its batch budget)."""
    row_bytes: int = 0
    """Upper bound on the encoded bytes of one row."""
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    """Results for the reader: (row_start, row_count, payload, row keys) or score tuples,
    then DONE or an exception. Bounded by scheduling, not by the queue itself."""
    next_row: int = 0
    """First row not yet handed to a batch."""
    buffered_rows: int = 0
    """Rows scheduled whose results the reader has not taken yet."""
    reserved_bytes: int = 0
    """Memory budget this job holds (set by the engine at admission)."""
    closed: bool = False
    """Finished, failed or cancelled: never scheduled again."""

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def queued_tokens(self) -> int:
        return (self.rows - self.next_row) * self.seq_len

    @property
    def batch_kind(self) -> tuple:
        """Jobs batch together only with the same kind, row length and attention mode."""
        return self.kind, self.seq_len, self.document_ids is not None

    def consumed(self, rows: int) -> None:
        """The reader took `rows` rows' results off the queue."""
        self.buffered_rows -= rows


class RoundRobin:
    """Open jobs, and batches taken from them one chunk per stream per round."""

    def __init__(self) -> None:
        self._jobs: collections.deque[Job] = collections.deque()

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: Job) -> None:
        self._jobs.append(job)

    def take(self, budget_tokens: int, buffer_bytes: int) -> list[tuple[Job, int, int]]:
        """(job, first row, row count) segments of one forward batch, at most
        `budget_tokens` tokens (one chunk may exceed it when alone); [] if no job can run."""
        while self._jobs and (self._jobs[0].closed or self._jobs[0].next_row >= self._jobs[0].rows):
            self._jobs.popleft()
        ready = [j for j in self._jobs if self.runnable(j, buffer_bytes)]
        if not ready:
            return []
        kind = ready[0].batch_kind
        ready = [j for j in ready if j.batch_kind == kind]
        taken: dict[Job, list[int]] = {}
        budget, progress = budget_tokens, True
        while progress:
            progress = False
            for job in ready:
                if not self.runnable(job, buffer_bytes):
                    continue
                rows = min(job.rows_per_chunk, job.rows - job.next_row)
                if rows * job.seq_len > budget and taken:
                    continue
                seg = taken.setdefault(job, [job.next_row, 0])
                seg[1] += rows
                job.next_row += rows
                job.buffered_rows += rows
                budget -= rows * job.seq_len
                progress = budget > 0
        # the next batch starts at the stream after this one's first: rotate it to the back
        first = ready[0]
        self._jobs.remove(first)
        self._jobs.append(first)
        return [(job, start, count) for job, (start, count) in taken.items()]

    @staticmethod
    def runnable(job: Job, buffer_bytes: int) -> bool:
        """The job has rows left and room in its stream buffer for its next chunk."""
        if job.closed or job.next_row >= job.rows:
            return False
        rows = min(job.rows_per_chunk, job.rows - job.next_row)
        return job.buffered_rows == 0 or (job.buffered_rows + rows) * job.row_bytes <= buffer_bytes
