"""`CacheSource`: a student's targets from the cache alone, no teacher anywhere.

Same `fetch` / `stream` as `TeacherClient`, so a trainer switches between
online and offline by swapping the object. Reads the namespace the targets were
stored in and, when the student asks for a sparser spec, derives it
(`ops.derive`: thinning, top-k truncation, re-tempering). A row the cache lacks
is an error naming the step and row, never silently zero targets.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from logitcast.cache import CacheNamespace, CacheReader
from logitcast.client.metrics import ClientMetrics
from logitcast.client.packing import PackedBatch
from logitcast.client.teacher_client import StepTargets, batch_units, is_padding, prefetched
from logitcast.ops import SparseTargets, TargetSpec
from logitcast.ops.codec import decode
from logitcast.ops.derive import can_derive, derive
from logitcast.ops.rowkey import draw_key, row_key


class CacheMissError(KeyError):
    """The cache has no targets for a row the student needs."""


class CacheSource:
    """Targets for packed batches, read from a cache directory."""

    def __init__(self, root: str | Path, stored: CacheNamespace, *,
                 spec: TargetSpec | None = None, device: str | torch.device = "cpu",
                 prefetch: int = 2, metrics: ClientMetrics | None = None) -> None:
        self.stored, self.spec = stored, spec or stored.spec
        if not can_derive(stored.spec, self.spec):
            raise ValueError(f"cannot derive {self.spec.key()} from the cached "
                             f"{stored.spec.key()}")
        self.reader = CacheReader(root, stored)
        if self.reader.dir is None:
            raise FileNotFoundError(f"no cache namespace {stored.name} under {root}")
        self.device = torch.device(device)
        self.vocab_size = self._vocab_size()
        self.metrics = metrics or ClientMetrics()
        self._pool = ThreadPoolExecutor(max_workers=prefetch)
        self.prefetch = prefetch

    def _vocab_size(self) -> int:
        for key in self.reader.keys()[:1]:
            return decode(self.reader.get(key)).vocab_size
        raise FileNotFoundError(f"cache namespace {self.stored.name} holds no targets")

    def fetch(self, batch: PackedBatch) -> StepTargets:
        parts = []
        for r, s, e in batch_units(batch):
            if is_padding(batch, (r, s, e)):
                parts.append(SparseTargets.empty(e - s, self.vocab_size,
                                                 tail_from_counts=self.spec.proposal_t == 1.0))
                continue
            key = row_key(batch.input_ids[r, s:e])
            payload = self.reader.get(key)
            if payload is None:
                raise CacheMissError(f"step {batch.step} row {r} [{s}:{e}] is not in cache "
                                     f"{self.reader.storage.root}/{self.stored.name}")
            part = decode(payload)
            if self.spec != self.stored.spec:
                part = derive(part, self.stored.spec, self.spec,
                              row_keys=torch.full((e - s,), draw_key(key), dtype=torch.int64),
                              positions=torch.arange(e - s))
            parts.append(part)
        self.metrics.cache_hits.inc(len(parts))
        targets = SparseTargets.cat(parts)
        return StepTargets(batch, targets.to(self.device) if self.device.type != "cpu" else targets,
                           len(parts))

    def stream(self, batches: Iterable[PackedBatch]) -> Iterator[StepTargets]:
        """Targets for `batches` in order, read `prefetch` steps ahead."""
        return prefetched(self.fetch, batches, self._pool, self.prefetch, self.metrics)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> CacheSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
