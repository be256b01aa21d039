"""What the teacher client and the offline cache source share: a step's targets
(`StepTargets`), a batch's cache units, and the in-order prefetch window.

Both sources take the trainer's `PackedBatch`es and give `StepTargets`; everything
here is about steps and rows, nothing about where the targets come from.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from logitcast.client.metrics import ClientMetrics
from logitcast.data.packing import IGNORE, PackedBatch
from logitcast.ops import SparseTargets
from logitcast.ops.rowkey import units


def prefetched(fetch, batches: Iterable[PackedBatch], pool: ThreadPoolExecutor, depth: int,
               metrics: ClientMetrics) -> Iterator[StepTargets]:
    """fetch(batch) for each batch, `depth` ahead on `pool`, yielded in order exactly once;
    the time the consumer waits is counted in `metrics.wait_seconds`."""
    pending: collections.deque[Future] = collections.deque()
    it = iter(batches)
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < depth:
                nxt = next(it, None)
                if nxt is None:
                    exhausted = True
                else:
                    pending.append(pool.submit(fetch, nxt))
            if not pending:
                return
            t0 = time.perf_counter()
            result = pending.popleft().result()
            metrics.wait_seconds.inc(time.perf_counter() - t0)
            metrics.steps.inc()
            yield result
    finally:
        for f in pending:
            f.cancel()


def batch_units(batch: PackedBatch) -> list[tuple[int, int, int]]:
    """(row, start, end) of every cache unit: whole rows, or document segments."""
    return units(batch.input_ids, batch.document_ids)


def is_padding(batch: PackedBatch, unit: tuple[int, int, int]) -> bool:
    """A document-mode padding segment: nothing in it is trained on."""
    r, s, e = unit
    return batch.document_ids is not None and bool((batch.labels[r, s:e] == IGNORE).all())


@dataclass(frozen=True)
class StepTargets:
    """A step's rows and their teacher targets (one SparseTargets over B*T positions)."""

    batch: PackedBatch
    targets: SparseTargets
    cache_hits: int
