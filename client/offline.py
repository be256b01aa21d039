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

Targets recorded while a teacher trained (`logitcast.trainer.record`) carry the
teacher step in the namespace's step logs (cache/steps.py): `steps=(lo, hi)`
serves only rows recorded at steps lo <= step < hi (a row outside the window,
or without a step, is a `CacheMissError` naming its step), a row recorded at
several steps is served from its latest record, and `served_steps` counts the
units served per teacher step.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from logitcast.cache import CacheCorruptError, CacheNamespace, CacheReader, Storage
from logitcast.cache.steps import check_step_window, payload_digest, read_step_logs
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
                 on_corrupt: str = "error", steps: tuple[int, int] | None = None) -> None:
        """on_corrupt: what a damaged record does: "error" (raise CacheCorruptError) or
        "skip" (that unit gets no targets, like padding). steps: (lo, hi), serve only
        targets recorded at teacher steps lo <= step < hi (a recorded namespace only)."""
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        self.steps = None if steps is None else check_step_window(steps)
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
            self.step_of, self.runs = read_step_logs(self.reader.storage, self.reader.dir)
            if self.steps is not None and not self.runs:
                raise ValueError(f"cache namespace {self.where} has no step logs (its targets "
                                 f"were not recorded during teacher training); a teacher-step "
                                 f"window [{self.steps[0]}, {self.steps[1]}) cannot apply")
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
        self._served: collections.Counter = collections.Counter()

    @property
    def served_steps(self) -> collections.Counter:
        """Units served per teacher step (None: recorded without a step log entry); empty
        for a namespace that was not recorded during teacher training."""
        with self._lock:
            return collections.Counter(self._served)

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
                payload = self._get(key, f"step {batch.step} row {r} [{s}:{e}]")
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

    def _get(self, key: bytes, what: str) -> bytes | None:
        """The payload to serve for `key`: with step logs, the copy of its latest recorded
        step (CacheMissError outside the window); else the reader's."""
        if not self.runs:
            return self.reader.get(key)
        entry = self.step_of.get(key)
        step = None if entry is None else entry.step
        if self.steps is not None and (step is None or not self.steps[0] <= step < self.steps[1]):
            if self.reader.contains(key):
                raise CacheMissError(
                    f"{what} was recorded at teacher step "
                    f"{'(unknown: no step-log entry)' if step is None else step}, outside the "
                    f"window [{self.steps[0]}, {self.steps[1]}) in cache {self.where}")
            return None
        payload = self.reader.get(key)
        if payload is not None and entry is not None and payload_digest(payload) != entry.digest:
            payload = next((p for p in self.reader.copies(key)
                            if payload_digest(p) == entry.digest), None)
            if payload is None:
                raise CacheCorruptError(f"{what}: the record of teacher step {step} that the "
                                        f"step log names is not in cache {self.where}")
        if payload is not None:
            with self._lock:
                self._served[step] += 1
        return payload

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
