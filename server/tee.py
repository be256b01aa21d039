"""The cache tee: every target the server streams is also written to the cache.

The compute thread hands (namespace, key, payload) to a bounded queue; a writer
thread appends them with one `CacheWriter` per namespace (this replica's own
writer id, so replicas sharing a cache never touch each other's shards). The
tee takes the root-level lock `writers/<writer id>.lock` when it is built, so a
second server with the same id on the same cache fails at startup
(`WriterIdInUseError`), not at its first record. When the writer falls behind,
`submit` blocks: serving slows down (counted in
`logitcast_cache_backpressure_seconds_total`) rather than dropping records. A
record that cannot be written (an I/O error, or a namespace whose writer id
another process holds) is dropped, counted in
`logitcast_cache_write_errors_total` and logged. `close` drains the queue, seals
the shards and releases the lock.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from pathlib import Path

from logitcast.cache import CacheNamespace, CacheWriter, Storage, WriterIdInUseError, open_storage
from logitcast.cache.records import check_writer_id
from logitcast.server.metrics import TeacherMetrics

logger = logging.getLogger(__name__)
_STOP = object()


class CacheTee:
    """Background writer of served targets into a cache (a directory or an fsspec URL)."""

    def __init__(self, root: str | Path | Storage, *, writer_id: str, metrics: TeacherMetrics,
                 max_queue: int = 1024, shard_bytes: int = 256 << 20) -> None:
        """writer_id: [A-Za-z0-9_]{1,64}, unique per server sharing the cache; another live
        process holding it raises WriterIdInUseError here."""
        self.storage = open_storage(root)
        self.writer_id, self.metrics = check_writer_id(writer_id), metrics
        self.shard_bytes = shard_bytes
        try:
            self._lease = self.storage.lock(
                f"writers/{writer_id}.lock",
                owner=f"cache tee on {socket.gethostname()} pid {os.getpid()}")
        except WriterIdInUseError as exc:
            raise WriterIdInUseError(f"cache writer id {writer_id!r} is in use in "
                                     f"{self.storage.url}: {exc}") from None
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._writers: dict[str, CacheWriter] = {}
        self._blocked: set[str] = set()  # namespaces whose writer id another process holds
        self._thread = threading.Thread(target=self._run, name="cache-tee", daemon=True)
        self._thread.start()

    def submit(self, namespace: CacheNamespace, key: bytes, payload: bytes) -> None:
        """Queue one record; blocks while the queue is full (backpressure)."""
        t0 = time.perf_counter()
        self._queue.put((namespace, key, payload))
        waited = time.perf_counter() - t0
        if waited > 1e-4:
            self.metrics.cache_backpressure_seconds.inc(waited)
        self.metrics.cache_queue.set(self._queue.qsize())

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            namespace, key, payload = item
            try:
                writer = self._writers.get(namespace.name)
                if writer is None:
                    writer = self._writers[namespace.name] = self._open_writer(namespace)
                if writer.put(key, payload):
                    self.metrics.cache_records.inc()
                    self.metrics.cache_bytes.inc(len(payload))
            except WriterIdInUseError as exc:
                self.metrics.cache_write_errors.inc()
                if namespace.name not in self._blocked:
                    self._blocked.add(namespace.name)
                    logger.error("cache writer id %s is held by another process in namespace "
                                 "%s: its records are dropped (counted in "
                                 "logitcast_cache_write_errors_total) until it is free: %s",
                                 self.writer_id, namespace.name, exc)
            except Exception:
                self.metrics.cache_write_errors.inc()
                logger.exception("cache write failed for namespace %s", namespace.name)
            self.metrics.cache_queue.set(self._queue.qsize())

    def _open_writer(self, namespace: CacheNamespace) -> CacheWriter:
        writer = CacheWriter(self.storage, namespace, writer_id=self.writer_id,
                             shard_bytes=self.shard_bytes)
        if namespace.name in self._blocked:
            self._blocked.discard(namespace.name)
            logger.info("cache writer id %s is free again in namespace %s; teeing resumed",
                        self.writer_id, namespace.name)
        return writer

    def close(self) -> None:
        """Write everything queued, seal every shard, then release the writer id."""
        self._queue.put(_STOP)
        self._thread.join()
        try:
            for writer in self._writers.values():
                writer.close()
        finally:
            self._lease.release()
        self.metrics.cache_queue.set(0)
