"""`CacheSource`: a student's targets from the cache alone, no teacher anywhere.

Same `fetch` / `stream` as `TeacherClient`, so a trainer switches between
online and offline by swapping the object. Reads the namespace the targets were
stored in and, when the student asks for a sparser spec, derives it
(`ops.derive`: thinning, top-k truncation, re-tempering). A row the cache lacks
is an error naming the step and row, never silently zero targets. A damaged
record (every stored copy failed its checks) is an error naming the step, row,
shard and offset, or, with on_corrupt="skip", a unit without targets (as for
padding), counted in `logitcast_client_cache_corrupt_records_total` and logged
once per shard.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from logitcast.cache import CacheCorruptError, CacheNamespace, CacheReader, Storage
from logitcast.client.metrics import ClientMetrics
from logitcast.client.steps import StepTargets, batch_units, is_padding, prefetched
from logitcast.data.packing import PackedBatch
from logitcast.ops import SparseTargets, TargetSpec
from logitcast.ops.codec import decode
from logitcast.ops.derive import can_derive, derive
from logitcast.ops.rowkey import draw_key, row_key

logger = logging.getLogger(__name__)
ON_CORRUPT = ("error", "skip")


class CacheMissError(KeyError):
    """The cache has no targets for a row the student needs."""


class CacheSource:
    """Targets for packed batches, read from a cache (a directory or an fsspec URL)."""

    def __init__(self, root: str | Path | Storage, stored: CacheNamespace, *,
                 spec: TargetSpec | None = None, device: str | torch.device = "cpu",
                 prefetch: int = 2, metrics: ClientMetrics | None = None,
                 on_corrupt: str = "error") -> None:
        """on_corrupt: what a damaged record does: "error" (raise CacheCorruptError) or
        "skip" (that unit gets no targets, like padding)."""
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        self.stored, self.spec, self.on_corrupt = stored, spec or stored.spec, on_corrupt
        if not can_derive(stored.spec, self.spec):
            raise ValueError(f"cannot derive {self.spec.key()} from the cached "
                             f"{stored.spec.key()}")
        self.reader = CacheReader(root, stored)
        self.where = f"{self.reader.storage.url}/{stored.name}"
        try:
            if self.reader.dir is None:
                raise FileNotFoundError(f"no cache namespace {stored.name} under "
                                        f"{self.reader.storage.url}")
            self.vocab_size = self._vocab_size()
        except BaseException:
            self.reader.close()
            raise
        self.device = torch.device(device)
        self.metrics = metrics or ClientMetrics()
        self._pool = ThreadPoolExecutor(max_workers=prefetch)
        self.prefetch = prefetch
        self._logged_shards: set[str] = set()
        self._lock = threading.Lock()

    def _vocab_size(self) -> int:
        """From the first readable record (`fetch` reports damaged ones where they are used)."""
        for key in self.reader.iter_keys():
            try:
                payload = self.reader.get(key)
            except CacheCorruptError:
                continue
            if payload is not None:
                return decode(payload).vocab_size
        raise FileNotFoundError(f"cache namespace {self.where} holds no readable targets")

    def fetch(self, batch: PackedBatch) -> StepTargets:
        parts, skipped = [], 0
        for r, s, e in batch_units(batch):
            if is_padding(batch, (r, s, e)):
                parts.append(self._empty(e - s))
                continue
            key = row_key(batch.input_ids[r, s:e])
            try:
                payload = self.reader.get(key)
            except CacheCorruptError as exc:
                if self.on_corrupt == "error":
                    raise CacheCorruptError(
                        f"step {batch.step} row {r} [{s}:{e}]: damaged record in cache "
                        f"{self.where}: {exc}", exc.shard, exc.offset) from exc
                self._skipped(exc)
                parts.append(self._empty(e - s))
                skipped += 1
                continue
            if payload is None:
                raise CacheMissError(f"step {batch.step} row {r} [{s}:{e}] is not in cache "
                                     f"{self.where}")
            part = decode(payload)
            if self.spec != self.stored.spec:
                part = derive(part, self.stored.spec, self.spec,
                              row_keys=torch.full((e - s,), draw_key(key), dtype=torch.int64),
                              positions=torch.arange(e - s))
            parts.append(part)
        self.metrics.cache_hits.inc(len(parts) - skipped)
        targets = SparseTargets.cat(parts)
        return StepTargets(batch, targets.to(self.device) if self.device.type != "cpu" else targets,
                           len(parts) - skipped)

    def _empty(self, n: int) -> SparseTargets:
        return SparseTargets.empty(n, self.vocab_size, tail_from_counts=self.spec.proposal_t == 1.0)

    def _skipped(self, exc: CacheCorruptError) -> None:
        self.metrics.cache_corrupt_records.inc()
        with self._lock:
            first = exc.shard not in self._logged_shards
            self._logged_shards.add(exc.shard)
        if first:
            logger.warning("damaged cache record skipped, its unit has no targets (further "
                           "ones in this shard are counted, not logged): %s", exc)

    def stream(self, batches: Iterable[PackedBatch]) -> Iterator[StepTargets]:
        """Targets for `batches` in order, read `prefetch` steps ahead."""
        return prefetched(self.fetch, batches, self._pool, self.prefetch, self.metrics)

    def close(self) -> None:
        try:
            self._pool.shutdown(wait=True, cancel_futures=True)
        finally:
            self.reader.close()

    def __enter__(self) -> CacheSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
