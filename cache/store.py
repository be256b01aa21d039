"""`TargetCache`: get/put of encoded targets in one namespace, as a client uses it.

A reader (refreshed at most every `refresh_s` on a miss) plus, when writable, a
writer. A damaged record is a miss here, never a crash: it is counted, logged
once per shard, reported to `on_corrupt`, and the next `put` of that key
re-writes it (a reader returns the first copy that passes its checks).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from logitcast.cache.namespace import CacheNamespace
from logitcast.cache.reader import CacheReader
from logitcast.cache.records import CacheCorruptError, check_record
from logitcast.cache.storage import Storage, open_storage
from logitcast.cache.writer import CacheWriter

logger = logging.getLogger(__name__)


class TargetCache:
    """get/put of encoded targets in one namespace: a reader, plus a writer if writable."""

    def __init__(self, root: str | Path | Storage, namespace: CacheNamespace, *,
                 writable: bool = False, writer_id: str | None = None, refresh_s: float = 1.0,
                 on_corrupt: Callable[[CacheCorruptError], None] | None = None) -> None:
        """writer_id: the writer's id when writable (default: unique per process)."""
        self.storage = open_storage(root)
        self.writer = (CacheWriter(self.storage, namespace, writer_id=writer_id)
                       if writable else None)
        self.reader = CacheReader(self.storage, namespace)
        self.refresh_s, self.on_corrupt = refresh_s, on_corrupt
        self.corrupt_records = 0
        self._damaged: set[bytes] = set()
        self._logged_shards: set[str] = set()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> bytes | None:
        """The payload, or None on a miss (absent or damaged)."""
        damaged = None
        try:
            if self.reader.contains(key, refresh_s=self.refresh_s):
                payload = self.reader.get(key)
                if payload is not None:
                    return payload
        except CacheCorruptError as exc:
            damaged = exc
        if self.writer is not None:  # a re-written copy, or one readers cannot see yet
            record = self.writer.read_open(key)
            if record is not None:
                return bytes(check_record(record, "open shard", 0, key))
        if damaged is not None:
            self._corrupt(key, damaged)
        return None

    def _corrupt(self, key: bytes, exc: CacheCorruptError) -> None:
        with self._lock:
            self.corrupt_records += 1
            self._damaged.add(key)
            first = exc.shard not in self._logged_shards
            self._logged_shards.add(exc.shard)
        if first:
            logger.warning("damaged cache record, treated as a miss (further ones in this "
                           "shard are counted, not logged): %s", exc)
        if self.on_corrupt is not None:
            self.on_corrupt(exc)

    def put(self, key: bytes, payload: bytes) -> None:
        if self.writer is None:
            raise PermissionError("this TargetCache was opened read-only (writable=False)")
        with self._lock:
            replace = key in self._damaged
            self._damaged.discard(key)
        self.writer.put(key, payload, replace=replace)

    def close(self) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        finally:
            self.reader.close()
