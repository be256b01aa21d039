"""`CacheWriter`: one process appending records to its own shards in one namespace.

A writer id is owned by one process at a time: the constructor takes a lock
(an OS lock on local disk, a lease object on an object store) and fails at once
with `WriterIdInUseError` if another live process holds it. The open shard is a
local file (in the namespace directory on local disk, so readers can tail it;
in a staging directory for object stores); sealing writes the shard's index run
first, then publishes the shard (a rename, or an upload). After each seal the
writer merges its own index runs once `merge_fanout` of a size tier exist, so a
reader consults O(log shards) runs per writer. What it does not know: other
writers' files (never opened, never removed), readers, compaction.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
from pathlib import Path

import numpy as np

from logitcast.cache.index import Columns, Run, encode_run, merge_runs
from logitcast.cache.namespace import CacheNamespace
from logitcast.cache.reader import CacheReader
from logitcast.cache.records import (
    COMPACT_ID,
    RUN_NAME,
    SHARD_HEADER,
    SHARD_NAME,
    CacheCorruptError,
    check_shard_header,
    check_writer_id,
    default_writer_id,
    encode_record,
    open_namespace,
    scan_records,
    shard_header,
)
from logitcast.cache.storage import Storage, WriterIdInUseError, open_storage

logger = logging.getLogger(__name__)


class CacheWriter:
    """Appends records to this writer's shards in one namespace. Thread-safe."""

    def __init__(self, root: str | Path | Storage, namespace: CacheNamespace, *,
                 writer_id: str | None = None, shard_bytes: int = 256 << 20,
                 skip_existing: bool = True, merge_fanout: int = 8,
                 adopt_orphans: bool = True) -> None:
        """writer_id: [A-Za-z0-9_]{1,64}; default unique per process (host, pid, random).
        skip_existing: `put` ignores keys already stored in the namespace: in this
        writer's open shard or any sealed shard (the on-disk index, refreshed after each
        seal and at most once a second on a miss). merge_fanout: runs of one size tier
        merged at once (>= 2). On an object store, a new writer first seals the staged
        shards of dead writers in the same staging directory (their ids' leases free), so
        a crashed writer's records are published whatever id its successor uses."""
        if shard_bytes < 64:
            raise ValueError(f"shard_bytes must be >= 64, got {shard_bytes}")
        if merge_fanout < 2:
            raise ValueError(f"merge_fanout must be >= 2, got {merge_fanout}")
        self.storage = open_storage(root)
        self.namespace, self.shard_bytes = namespace, shard_bytes
        self.writer_id = check_writer_id(default_writer_id() if writer_id is None else writer_id)
        if self.writer_id == COMPACT_ID:
            raise ValueError(f"writer_id {COMPACT_ID!r} is reserved for `logitcast cache compact`")
        self.merge_fanout = merge_fanout
        self.dir = open_namespace(self.storage, namespace, create=True)
        self._lease = self.storage.lock(f"{self.dir}/{self.writer_id}.lock",
                                        owner=f"{socket.gethostname()} pid {os.getpid()}")
        self._lock = threading.Lock()
        try:
            self._staging = Path(self.storage.staging_dir(self.dir))
            self._staging.mkdir(parents=True, exist_ok=True)
            if not self.storage.is_local and adopt_orphans:
                self._seal_orphans()
            # dedupe against sealed runs and our own open shard; other writers' open shards
            # are not tailed (a rare duplicate is harmless, tailing them is not free)
            self._reader = (CacheReader(self.storage, namespace, tail_open=False)
                            if skip_existing else None)
            self._seq = self._last_seq()
            self._file = None
            self._open: dict[bytes, tuple[int, int]] = {}
            self._size = 0
            self.records_written = self.bytes_written = 0
            if (self._staging / self._shard_file("open")).exists():
                self._resume_open_shard()
        except BaseException:
            self._lease.release()
            raise

    def _seal_orphans(self) -> None:
        orphans = {m["writer"] for m in map(SHARD_NAME.fullmatch, os.listdir(self._staging))
                   if m and m["suffix"] == "open" and m["writer"] != self.writer_id}
        for other in sorted(orphans):
            try:
                CacheWriter(self.storage, self.namespace, writer_id=other, skip_existing=False,
                            shard_bytes=self.shard_bytes, adopt_orphans=False).close()
                logger.warning("sealed the staged shard dead writer %s left in %s", other,
                               self._staging)
            except WriterIdInUseError:  # alive (or its lease not yet expired)
                continue

    # --------------------------------------------------------------------- naming

    def _shard_file(self, suffix: str, seq: int | None = None) -> str:
        return f"{self.writer_id}-{self._seq if seq is None else seq:06d}.{suffix}"

    def _last_seq(self) -> int:
        seqs = [-1]
        for name in [*self.storage.list(self.dir), *os.listdir(self._staging)]:
            m = SHARD_NAME.fullmatch(name) or RUN_NAME.fullmatch(name)
            if m and m["writer"] == self.writer_id:
                seqs.append(int(m["seq"] if "seq" in m.groupdict() else
                                (m["last"] or m["first"])))
        return max(seqs)

    # --------------------------------------------------------------------- writing

    def _resume_open_shard(self) -> None:
        path = self._staging / self._shard_file("open")
        data = path.read_bytes()
        try:
            check_shard_header(data, str(path))
        except CacheCorruptError:
            logger.warning("%s: unreadable header; starting the shard over", path)
            path.unlink()
            return
        good = SHARD_HEADER.size
        for key, loc in scan_records(data, str(path), strict=False):
            self._open[key] = (loc.offset, loc.length)
            good = loc.offset + loc.length
        if good < len(data):
            logger.warning("%s: truncating a torn tail of %d bytes", path, len(data) - good)
            os.truncate(path, good)
        self._file, self._size = open(path, "ab", buffering=0), good

    def __contains__(self, key: bytes) -> bool:
        return key in self._open or (self._reader is not None and key in self._reader)

    def put(self, key: bytes, payload: bytes, *, replace: bool = False) -> bool:
        """Append one record; False if an intact copy of the key is already stored
        (checked by reading it: duplicates are rare). `replace`: write regardless."""
        record = encode_record(key, payload)
        with self._lock:
            if key in self._open or (not replace and self._stored_intact(key)):
                return False
            if self._file is None:  # a new shard appears with its header already in place
                self._seq += 1
                path = self._staging / self._shard_file("open")
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_bytes(shard_header())
                os.replace(tmp, path)
                self._file, self._size, self._open = open(path, "ab", buffering=0), \
                    SHARD_HEADER.size, {}
            written = self._file.write(record)
            if written != len(record):
                raise OSError(f"short write to {self._file.name}")
            self._open[key] = (self._size, len(record))
            self._size += len(record)
            self.records_written += 1
            self.bytes_written += len(record)
            if self._size >= self.shard_bytes:
                self._seal()
            return True

    def _stored_intact(self, key: bytes) -> bool:
        """Whether a sealed copy of `key` exists and passes its checks (a damaged one is
        replaced: a tee heals records its clients found damaged by writing them again)."""
        if self._reader is None or not self._reader.contains(key, refresh_s=1.0):
            return False
        try:
            return self._reader.get(key) is not None
        except CacheCorruptError:
            logger.warning("re-writing a damaged stored record of key %s", key.hex())
            return False

    def read_open(self, key: bytes) -> bytes | None:
        """The record bytes of `key` if it is in this writer's open shard (which an
        object store's readers cannot see until it is sealed)."""
        with self._lock:
            where = self._open.get(key)
            if where is None or self._file is None:
                return None
            with open(self._file.name, "rb") as f:
                f.seek(where[0])
                return f.read(where[1])

    def flush(self) -> None:
        """Make every record written so far durable (fsync)."""
        with self._lock:
            if self._file is not None:
                os.fsync(self._file.fileno())

    def seal(self) -> None:
        """Publish the open shard: fsync, publish its index run, then the shard."""
        with self._lock:
            self._seal()

    def _seal(self) -> None:
        if self._file is None:
            return
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        keys = list(self._open)
        where = np.array([self._open[k] for k in keys], dtype=np.uint64).reshape(-1, 2)
        cols = Columns.build(keys, where[:, 0], where[:, 1])
        shard = self._shard_file("shard")
        self.storage.write_atomic(f"{self.dir}/{self._shard_file('index')}",
                                  encode_run([shard], cols))
        self.storage.publish_file(self._staging / self._shard_file("open"), f"{self.dir}/{shard}")
        self._open = {}
        self._merge_own_runs()
        if self._reader is not None:  # its keys move from `_open` to a run the reader sees
            self._reader.refresh()

    # --------------------------------------------------------------------- index merges

    def _merge_own_runs(self) -> None:
        """Tiered merge of this writer's runs: `merge_fanout` runs covering a similar
        number of shards become one. Inputs are removed only after the output is
        published; a crash in between leaves runs another run subsumes, removed here."""
        mine = []
        for name in self.storage.list(self.dir):
            m = RUN_NAME.fullmatch(name)
            if m and m["writer"] == self.writer_id:
                first = int(m["first"])
                mine.append((first, int(m["last"] or first), name))
        for first, last, name in mine:  # left over from a merge killed before its cleanup
            if any(f <= first and last <= la and (f, la) != (first, last) for f, la, _ in mine):
                self.storage.remove(f"{self.dir}/{name}")
        mine = [r for r in mine if not any(f <= r[0] and r[1] <= la and (f, la) != r[:2]
                                           for f, la, _ in mine)]
        tiers: dict[int, list] = {}
        for first, last, name in sorted(mine):
            tiers.setdefault(int(math.log(last - first + 1, self.merge_fanout) + 1e-9),
                             []).append((first, last, name))
        for group in tiers.values():
            if len(group) >= self.merge_fanout:
                self._merge(group[:self.merge_fanout])

    def _merge(self, group: list[tuple[int, int, str]]) -> None:
        prefix = f"{self.dir}/"
        runs = [Run(prefix + n, self.storage.local_path(prefix + n), prefix) for _, _, n in group]
        try:
            names, cols = merge_runs(runs, prefix)
        except ValueError as exc:  # a damaged input: leave it for `cache verify --repair`
            logger.warning("not merging index runs of %s: %s", self.writer_id, exc)
            return
        finally:
            for run in runs:
                run.close()
        out = f"{self.writer_id}-{group[0][0]:06d}-{group[-1][1]:06d}.index"
        self.storage.write_atomic(prefix + out, encode_run(names, cols))
        for _, _, name in group:
            self.storage.remove(prefix + name)

    def close(self) -> None:
        """Seal the open shard and give up the writer id."""
        try:
            self.seal()
        finally:
            if self._reader is not None:
                self._reader.close()
            self._lease.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
