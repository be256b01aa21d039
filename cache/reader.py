"""`CacheReader`: random and in-order access to every writer's records in one namespace.

Lookups binary-search memory-mapped index runs (cache/index.py), so heap
memory is O(index files), not O(records); only the records of shards still
open on local disk (tailed incrementally from the last offset seen) live in a
dict, bounded by the writers' shard size. Every returned payload has passed its
record's magic, length, key and CRC checks; a key stored in several places (a
damaged copy re-written, a compaction in flight) returns the first copy that
passes. A damaged record with no good copy raises `CacheCorruptError` naming
shard and offset; a shard that vanished (compaction) is a miss after one
refresh. Reads in write order are detected per shard and served from readahead
blocks (the next one fetched in the background), so a student replaying the
writer's packing reads shards sequentially.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from logitcast.cache.index import Columns, IndexCorruptError, Run, encode_run
from logitcast.cache.namespace import CacheNamespace
from logitcast.cache.records import (
    CRC,
    MAX_PAYLOAD,
    REC_HEAD,
    RUN_NAME,
    SHARD_HEADER,
    SHARD_NAME,
    CacheCorruptError,
    Location,
    check_record,
    check_shard_header,
    open_namespace,
    record_problem,
    scan_records,
)
from logitcast.cache.storage import Storage, open_storage
from logitcast.cache.v1 import V1_INDEX_MAGIC, v1_index_columns

logger = logging.getLogger(__name__)


class _Block:
    """A readahead block of one shard, with the next `depth` blocks already being fetched."""

    def __init__(self, start: int, data: bytes, fetch, size: int, depth: int) -> None:
        self.start, self.data, self.fetch, self.size = start, data, fetch, size
        self.ahead: deque[Future] = deque()
        self._next_at = start + len(data)
        if len(data) == size:  # not at the end of the shard
            for _ in range(depth):
                self._submit()

    def _submit(self) -> None:
        self.ahead.append(self.fetch(self._next_at))
        self._next_at += self.size

    def take(self, offset: int, length: int):
        """The bytes [offset, offset + length) if this block (or the next) has them."""
        for _ in range(2):
            end = self.start + len(self.data)
            if self.start <= offset and offset + length <= end:
                return memoryview(self.data)[offset - self.start:offset - self.start + length]
            if not self.ahead or not self.start <= offset <= end:
                return None
            more = self.ahead.popleft().result()  # advance: keep the unread tail
            self.data = self.data[offset - self.start:] + more
            self.start = offset
            if len(more) == self.size:
                self._submit()
            else:  # the end of the shard: nothing further to fetch
                self.ahead.clear()
        return None


def shard_columns(data, shard: str) -> Columns:
    """The index entries of a shard's valid records, rebuilt by scanning its bytes."""
    found = list(scan_records(data, shard, strict=False))
    return Columns.build([k for k, _ in found], [loc.offset for _, loc in found],
                         [loc.length for _, loc in found])


def load_run(storage: Storage, name: str, prefix: str) -> Run:
    """Open the index run `name` (a version-1 index is converted in memory)."""
    path = storage.local_path(name)
    with open(path, "rb") as f:
        if f.read(4) == V1_INDEX_MAGIC:
            shard = name[len(prefix):-len(".index")] + ".shard"
            return Run(name, encode_run([shard], v1_index_columns(Path(path).read_bytes(), name)),
                       prefix)
    return Run(name, path, prefix)


class CacheReader:
    """Random access by key and sequential scans over every writer's shards."""

    def __init__(self, root: str | Path | Storage, namespace: CacheNamespace, *,
                 tail_open: bool = True, readahead_bytes: int | None = None,
                 readahead_depth: int = 2, readahead_shards: int = 4) -> None:
        """tail_open: also index records of shards still being written (local disk).
        readahead_bytes: block size for reads in write order (0 disables; default 8 MiB
        on object stores, 0 on local disk, where the kernel's own readahead of sequential
        preads measured faster); `readahead_depth` blocks are fetched ahead in parallel,
        and each reading thread keeps blocks for `readahead_shards` shards."""
        self.storage = open_storage(root)
        self.namespace, self.tail_open = namespace, tail_open
        if readahead_bytes is None:
            readahead_bytes = 0 if self.storage.is_local else 8 << 20
        if readahead_bytes < 0 or readahead_depth < 1 or readahead_shards < 1:
            raise ValueError(f"readahead_bytes >= 0, readahead_depth and readahead_shards >= 1,"
                             f" got {readahead_bytes}, {readahead_depth}, {readahead_shards}")
        self.readahead_bytes, self.readahead_shards = readahead_bytes, readahead_shards
        self.readahead_depth = readahead_depth
        self.dir = open_namespace(self.storage, namespace, create=False)
        self._runs: list[Run] = []
        self._run_names: set[str] = set()
        self._open: dict[str, tuple[int, dict[bytes, Location]]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self._last_refresh = 0.0
        self.missing_shards: set[str] = set()
        self.refresh()

    # --------------------------------------------------------------------- index

    def refresh(self) -> None:
        """Pick up runs published, shards sealed and records appended since the last look."""
        self._last_refresh = time.monotonic()
        if self.dir is None:
            self.dir = open_namespace(self.storage, self.namespace, create=False)
            if self.dir is None:
                return
        names = self.storage.list(self.dir)
        listed = set(names)
        prefix = f"{self.dir}/"
        runs = {n: r for n, r in ((r.name.rsplit("/", 1)[1], r) for r in self._runs)
                if n in listed}
        for name in names:
            if RUN_NAME.fullmatch(name) and name not in runs:
                run = self._load_run(prefix + name, prefix)
                if run is not None:
                    runs[name] = run
        shards = {prefix + n for n in names if n.endswith(".shard") and SHARD_NAME.fullmatch(n)}
        chosen, covered = [], set()
        for run in sorted(runs.values(), key=lambda r: (-len(r.shards), r.name)):
            if not set(run.shards) <= covered:  # a run another run subsumes is redundant
                chosen.append(run)
                covered |= set(run.shards)
        for shard in sorted(shards - covered):  # no (readable) index: rebuild from the shard
            run = self._rebuild_run(shard)
            if run is not None:
                chosen.append(run)
        opens = {prefix + n for n in names if n.endswith(".open")} if self.tail_open else set()
        with self._lock:
            self._runs = chosen
            self._open = {k: v for k, v in self._open.items() if k in opens}
        for name in sorted(opens):
            self._tail(name)

    def _load_run(self, name: str, prefix: str) -> Run | None:
        try:
            return load_run(self.storage, name, prefix)
        except FileNotFoundError:
            return None
        except IndexCorruptError as exc:
            logger.warning("%s; its shards are read without it", exc)
            return None

    def indexed_shards(self) -> set[str]:
        """Shards covered by an index run read from storage (not rebuilt in memory)."""
        with self._lock:
            return {s for r in self._runs if not r.name.endswith(".rebuilt") for s in r.shards}

    def _rebuild_run(self, shard: str) -> Run | None:
        try:
            data = self.storage.read(shard)
            check_shard_header(data, shard)
        except FileNotFoundError:
            return None
        except CacheCorruptError as exc:
            logger.warning("%s: skipped", exc)
            return None
        cols = shard_columns(data, shard)
        logger.warning("%s has no readable index; rebuilt one in memory from %d records "
                       "(`logitcast cache verify --repair` writes it back)", shard, len(cols))
        return Run(shard + ".rebuilt", encode_run([shard.rsplit("/", 1)[1]], cols),
                   f"{self.dir}/")

    def _tail(self, name: str) -> None:
        start, seen = self._open.get(name, (0, {}))
        try:
            if start == 0:
                check_shard_header(self.storage.read(name, 0, SHARD_HEADER.size), name)
                start = SHARD_HEADER.size
            size = self.storage.size(name)
            data = self.storage.read(name, start, size - start) if size > start else b""
        except (FileNotFoundError, CacheCorruptError):  # sealed meanwhile, or still empty
            return
        end = start
        for key, loc in scan_records(data, name, start=0, strict=False):
            seen.setdefault(key, Location(name, start + loc.offset, loc.length))
            end = start + loc.offset + loc.length
        with self._lock:
            self._open[name] = (end, seen)

    def _where(self, key: bytes) -> Iterator[tuple[str, int, int]]:
        """(shard, offset, length) of every place `key` is indexed, lazily: runs first
        (largest first), then open shards. Reads attributes refresh() swaps atomically."""
        hi, lo = int.from_bytes(key[:8], "big"), int.from_bytes(key[8:16], "big")
        for run in self._runs:
            found = run.find(hi, lo)
            if found is not None:
                yield found
        if self._open:
            for _, seen in list(self._open.values()):
                loc = seen.get(key)
                if loc is not None:
                    yield loc.shard, loc.offset, loc.length

    def locations(self, key: bytes) -> list[Location]:
        """Every place `key` is indexed, in the order `get` tries them."""
        return [Location(*where) for where in self._where(key)]

    def contains(self, key: bytes, refresh_s: float | None = None) -> bool:
        """Whether `key` is indexed; if not and `refresh_s` has passed since the last
        refresh, refresh and look again."""
        if self.locations(key):
            return True
        if refresh_s is not None and time.monotonic() - self._last_refresh >= refresh_s:
            self.refresh()
            return bool(self.locations(key))
        return False

    def __contains__(self, key: bytes) -> bool:
        return self.contains(key)

    def __len__(self) -> int:
        """Index entries (a key stored twice counts twice)."""
        with self._lock:
            return sum(len(r) for r in self._runs) + sum(len(s) for _, s in self._open.values())

    def iter_keys(self) -> Iterator[bytes]:
        """Every indexed key once per entry, run by run (sorted within a run)."""
        from logitcast.cache.index import join_key
        with self._lock:
            runs, opens = list(self._runs), [list(s) for _, s in self._open.values()]
        for run in runs:
            for start in range(0, len(run), 1 << 16):
                for hi, lo in zip(run.hi[start:start + (1 << 16)].tolist(),
                                  run.lo[start:start + (1 << 16)].tolist()):
                    yield join_key(hi, lo)
        for keys in opens:
            yield from keys

    # --------------------------------------------------------------------- records

    def get(self, key: bytes) -> bytes | None:
        """The payload for `key`, checked; None if absent; CacheCorruptError (naming the
        shard and offset) if every stored copy is damaged."""
        for attempt in range(2):
            damaged, missing = None, False
            for shard, offset, length in self._where(key):
                try:
                    data = self._read(shard, offset, length)
                except FileNotFoundError:
                    missing = True
                    continue
                except (OSError, ValueError, OverflowError) as exc:  # a damaged entry
                    damaged = damaged or CacheCorruptError(
                        f"{shard} offset {offset}: unreadable: {exc}", shard, offset)
                    continue
                try:
                    return bytes(check_record(data, shard, offset, key))
                except CacheCorruptError as exc:
                    damaged = damaged or exc
            if damaged is not None:
                raise damaged
            if not missing or attempt:
                return None
            self.refresh()  # a shard was sealed or compacted away: look again
        return None

    def copies(self, key: bytes) -> Iterator[bytes]:
        """Every intact stored payload of `key`, in the order `get` tries them (damaged or
        vanished copies are skipped): a key recorded again, at a later teacher step,
        has several different ones (cache/steps.py says which one is meant)."""
        for shard, offset, length in list(self._where(key)):
            try:
                yield bytes(check_record(self._read(shard, offset, length), shard, offset, key))
            except (OSError, ValueError, OverflowError):  # CacheCorruptError is a ValueError
                continue

    def _read(self, shard: str, offset: int, length: int):
        if not self.readahead_bytes or length >= self.readahead_bytes:
            return self.storage.read(shard, offset, length)
        blocks = getattr(self._local, "blocks", None)
        if blocks is None:
            blocks = self._local.blocks = OrderedDict()
            self._local.expected = {}
        block = blocks.get(shard)
        if block is not None:
            got = block.take(offset, length)
            if got is not None:
                blocks.move_to_end(shard)
                return got
        at, streak = self._local.expected.get(shard, (-1, 0))
        streak = streak + 1 if at == offset else 0
        self._local.expected[shard] = (offset + length, streak)
        if streak < 2:  # random access (or not yet three in a row): read just the record
            return self.storage.read(shard, offset, length)
        blocks[shard] = block = _Block(
            offset, self.storage.read(shard, offset, self.readahead_bytes),
            lambda at, shard=shard: self._prefetch(shard, at), self.readahead_bytes,
            self.readahead_depth)
        while len(blocks) > self.readahead_shards:
            blocks.popitem(last=False)
        got = block.take(offset, length)
        return got if got is not None else self.storage.read(shard, offset, length)

    def _prefetch(self, shard: str, offset: int, length: int = 0) -> Future:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=self.readahead_depth,
                                                    thread_name_prefix="cache-readahead")
        return self._pool.submit(self.storage.read, shard, offset, length or self.readahead_bytes)

    def scan(self) -> Iterator[tuple[bytes, memoryview]]:
        """Every valid (key, payload) of every sealed and open shard, shard by shard in
        write order, read in `readahead_bytes` blocks (payloads are views, checked)."""
        if self.dir is None:
            return
        for name in self.storage.list(self.dir):
            if SHARD_NAME.fullmatch(name) and (name.endswith(".shard") or self.tail_open):
                yield from self._scan_shard(f"{self.dir}/{name}")

    def _scan_shard(self, shard: str) -> Iterator[tuple[bytes, memoryview]]:
        step = max(self.readahead_bytes, 1 << 20)
        try:
            head = self.storage.read(shard, 0, SHARD_HEADER.size)
            check_shard_header(head, shard)
        except (FileNotFoundError, CacheCorruptError) as exc:
            logger.warning("scan skips %s: %s", shard, exc)
            return
        block = _Block(SHARD_HEADER.size, self.storage.read(shard, SHARD_HEADER.size, step),
                       lambda at: self._prefetch(shard, at, step), step,
                       self.readahead_depth if self.readahead_bytes else 1)
        off = SHARD_HEADER.size
        while True:
            head = block.take(off, REC_HEAD.size)
            if head is None:
                return  # the end
            n = REC_HEAD.unpack_from(head)[1]
            rec = block.take(off, REC_HEAD.size + n + CRC.size) if n <= MAX_PAYLOAD else None
            problem, key, total = record_problem(rec, 0, len(rec)) if rec is not None else \
                ("record runs past the end", b"", 0)
            if problem is not None:
                if shard.endswith(".shard"):
                    logger.warning("scan stops in %s at offset %d: %s", shard, off, problem)
                return
            yield key, rec[REC_HEAD.size:total - CRC.size]
            off += total

    def close(self) -> None:
        with self._lock:
            runs, self._runs = self._runs, []
            self._open = {}
        for run in runs:
            run.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
