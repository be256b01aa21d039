"""The cache tee: every target the server streams is also written to the cache.

The compute thread hands (namespace, key, payload) to a bounded queue; a writer
thread appends them with one `CacheWriter` per namespace (this replica's own
writer id, so replicas sharing a cache directory never touch each other's
shards). When the writer falls behind, `submit` blocks: serving slows down
(counted in `logitcast_cache_backpressure_seconds_total`) rather than dropping
records. `close` drains the queue and seals the shards.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

from logitcast.cache import CacheNamespace, CacheWriter
from logitcast.server.metrics import TeacherMetrics

logger = logging.getLogger(__name__)
_STOP = object()


class CacheTee:
    """Background writer of served targets into a cache directory."""

    def __init__(self, root: str | Path, *, writer_id: str, metrics: TeacherMetrics,
                 max_queue: int = 1024, shard_bytes: int = 256 << 20) -> None:
        self.root, self.writer_id, self.metrics = Path(root), writer_id, metrics
        self.shard_bytes = shard_bytes
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._writers: dict[str, CacheWriter] = {}
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
                    writer = self._writers[namespace.name] = CacheWriter(
                        self.root, namespace, writer_id=self.writer_id,
                        shard_bytes=self.shard_bytes)
                if writer.put(key, payload):
                    self.metrics.cache_records.inc()
                    self.metrics.cache_bytes.inc(len(payload))
            except Exception:
                self.metrics.cache_write_errors.inc()
                logger.exception("cache write failed for namespace %s", namespace.name)
            self.metrics.cache_queue.set(self._queue.qsize())

    def close(self) -> None:
        """Write everything queued, then seal every shard."""
        self._queue.put(_STOP)
        self._thread.join()
        for writer in self._writers.values():
            writer.close()
        self.metrics.cache_queue.set(0)
