"""Offline care of a cache namespace: `verify` (optionally `repair`) and `compact`.

Neither ever touches a live writer's files: both take the lock of every writer
id whose files they change (an OS lock or lease, as a writer does), and skip
ids another process holds. Both are crash-safe by ordering: new files are
published whole before the files they replace are removed, and a reader treats
redundant runs and leftover inputs as harmless (a run subsumed by a larger one
is ignored; a key found twice returns the first copy that passes its checks).

- verify: every index run's checksums, every run entry against the record it
  points at, every sealed shard's records. `repair` then quarantines damaged
  shards (their readable records are first salvaged into a fresh shard),
  removes damaged runs, and writes an index run for every shard left without
  one.
- compact: seals shards dead writers left open (truncating a torn tail) and
  merges every dead writer's index runs (and earlier compactions') into one run
  (an LSM-style compaction of the index; record data is never rewritten).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable

import numpy as np

from logitcast.cache.index import IndexCorruptError, Run, encode_run, merge_runs
from logitcast.cache.namespace import CacheNamespace
from logitcast.cache.reader import CacheReader, load_run, shard_columns
from logitcast.cache.records import (
    COMPACT_ID,
    CRC,
    REC_HEAD,
    RECORD_MAGIC,
    RUN_NAME,
    SHARD_NAME,
    CacheCorruptError,
    check_shard_header,
    open_namespace,
    record_problem,
)
from logitcast.cache.storage import Storage, WriterIdInUseError, open_storage
from logitcast.cache.v1 import V1_INDEX_MAGIC
from logitcast.cache.writer import CacheWriter

logger = logging.getLogger(__name__)
QUARANTINE = "quarantine"


def _owner() -> str:
    return f"{socket.gethostname()} pid {os.getpid()} (logitcast cache maintenance)"


@contextlib.contextmanager
def _dead_writers(storage: Storage, directory: str, writers: Iterable[str]):
    """Lock every writer id no live process holds; yields the set of locked ids."""
    held = {}
    try:
        for w in sorted(set(writers)):
            try:
                held[w] = storage.lock(f"{directory}/{w}.lock", owner=_owner())
            except WriterIdInUseError:
                logger.info("writer %s is live: its files are left alone", w)
        yield set(held)
    finally:
        for lock in held.values():
            lock.release()


def _writer_of(name: str) -> str | None:
    m = SHARD_NAME.fullmatch(name) or RUN_NAME.fullmatch(name)
    return m["writer"] if m else None


# ---------------------------------------------------------------------------- verify

def _salvage(data, shard: str) -> tuple[list[tuple[bytes, int, int]], list[str]]:
    """Valid records of a damaged shard, resynchronising on the record magic after
    each bad stretch; and one problem line per bad stretch."""
    good, problems, off, end = [], [], 16, len(data)
    while off < end:
        problem, key, total = record_problem(data, off, end)
        if problem is None:
            good.append((key, off, total))
            off += total
            continue
        problems.append(f"{shard} offset {off}: {problem}")
        nxt = bytes(data).find(RECORD_MAGIC, off + 1)
        off = end if nxt < 0 else nxt
    return good, problems


def _check_run_entries(storage: Storage, run: Run, readable: set[str]) -> list[str]:
    """Every entry of `run` against the record at its location (one shard in memory at a
    time)."""
    problems = []
    for s, shard in enumerate(run.shards):
        sel = np.nonzero(run.shard == s)[0]
        if not len(sel):
            continue
        if shard not in readable:
            problems.append(f"{run.name}: indexes {shard}, which is missing or unreadable")
            continue
        data = storage.read(shard)
        for i in sel.tolist():
            off, n = int(run.offset[i]), int(run.length[i])
            key = int(run.hi[i]).to_bytes(8, "big") + int(run.lo[i]).to_bytes(8, "big")
            problem, found, total = record_problem(data[off:off + n], 0, n) if \
                off + n <= len(data) else ("points past the end of its shard", b"", 0)
            if problem is None and (found != key or total != n):
                problem = "points at a record of another key"
            if problem is not None:
                problems.append(f"{run.name}: entry for {shard} offset {off}: {problem}")
                break
    return problems


def verify(root: str | Storage, namespace: CacheNamespace, *, repair: bool = False,
           progress: Callable[[Iterable], Iterable] = lambda x: x) -> list[str]:
    """One line per problem, naming the file (and offset). With `repair`, fix what can
    be fixed without touching live writers' files (see the module docstring)."""
    storage = open_storage(root)
    directory = open_namespace(storage, namespace, create=False)
    if directory is None:
        return []
    prefix = f"{directory}/"
    names = storage.list(directory)
    problems: list[str] = []
    readable: set[str] = set()  # shards whose header reads (not their bytes: caches are big)
    damaged: set[str] = set()
    salvaged: dict[str, list] = {}
    for name in progress([n for n in names if SHARD_NAME.fullmatch(n)]):
        full = prefix + name
        try:
            data = storage.read(full)
            check_shard_header(data, full)
        except (FileNotFoundError, CacheCorruptError) as exc:
            problems.append(str(exc))
            damaged.add(full)
            continue
        readable.add(full)
        if name.endswith(".open"):  # a live writer's torn tail is expected
            continue
        good, bad = _salvage(data, full)
        if bad:
            problems += bad
            damaged.add(full)
            salvaged[full] = good
    bad_runs = []
    for name in [n for n in names if RUN_NAME.fullmatch(n)]:
        try:
            run = load_run(storage, prefix + name, prefix)
            run.check()
            found = _check_run_entries(storage, run, readable)
            run.close()
        except (IndexCorruptError, CacheCorruptError, FileNotFoundError) as exc:
            found = [str(exc)]
        if found:
            problems += found
            bad_runs.append(name)
    if repair:
        _repair(storage, namespace, directory, names, damaged, salvaged, bad_runs, readable)
    return list(dict.fromkeys(problems))


def _repair(storage, namespace, directory, names, damaged, salvaged, bad_runs, readable):
    prefix = f"{directory}/"
    owners = {_writer_of(n) for n in names} - {None}
    with _dead_writers(storage, directory, owners) as dead:
        if salvaged:
            with CacheWriter(storage, namespace, writer_id=f"repair_{int(time.time())}",
                             skip_existing=False) as w:
                for shard, good in salvaged.items():
                    if _writer_of(shard.rsplit("/", 1)[1]) not in dead:
                        continue
                    data = storage.read(shard)
                    for key, off, total in good:
                        w.put(key, bytes(data[off + REC_HEAD.size:off + total - CRC.size]))
        for shard in sorted(damaged):
            name = shard.rsplit("/", 1)[1]
            if _writer_of(name) not in dead or name.endswith(".open"):
                continue
            if shard in readable:
                storage.write_atomic(f"{directory}/{QUARANTINE}/{name}", storage.read(shard))
            storage.remove(shard)
            logger.warning("quarantined %s (%d readable records salvaged)", shard,
                           len(salvaged.get(shard, [])))
        for name in bad_runs:
            if _writer_of(name) in dead or _writer_of(name) == COMPACT_ID:
                storage.remove(prefix + name)
        reader = CacheReader(storage, namespace, tail_open=False)
        covered = reader.indexed_shards()
        for shard in sorted(reader.storage.list(directory)):
            full = prefix + shard
            if not shard.endswith(".shard") or full in covered or _writer_of(shard) not in dead:
                continue
            data = storage.read(full)
            storage.write_atomic(full[:-len(".shard")] + ".index",
                                 encode_run([shard], shard_columns(data, full)))
        reader.close()


# ---------------------------------------------------------------------------- compact

def compact(root: str | Storage, namespace: CacheNamespace) -> dict:
    """Seal dead writers' open shards and merge their index runs into one. Returns
    counts: sealed, merged (runs in), entries (in the new run), skipped_live."""
    storage = open_storage(root)
    directory = open_namespace(storage, namespace, create=False)
    if directory is None:
        raise FileNotFoundError(f"no cache namespace {namespace.name} in {storage.url}")
    prefix = f"{directory}/"
    names = storage.list(directory)
    owners = {_writer_of(n) for n in names} - {None, COMPACT_ID}
    sealed = 0
    for w in sorted({_writer_of(n) for n in names if n.endswith(".open")} - {None}):
        try:  # resuming a dead writer truncates its torn tail; closing seals the shard
            CacheWriter(storage, namespace, writer_id=w, skip_existing=False).close()
            sealed += 1
        except WriterIdInUseError:
            pass
    names = storage.list(directory)
    with _dead_writers(storage, directory, owners | {COMPACT_ID}) as dead:
        if COMPACT_ID not in dead:
            raise WriterIdInUseError(f"another `cache compact` is running on {storage.url}/"
                                     f"{directory}")
        inputs = [n for n in names if RUN_NAME.fullmatch(n) and _writer_of(n) in dead]
        runs = [load_run(storage, prefix + n, prefix) for n in inputs]
        shard_sets = [set(r.shards) for r in runs]
        keep = [r for i, r in enumerate(runs)  # leftovers of a merge killed before cleanup
                if not any(j != i and shard_sets[i] <= shard_sets[j] and
                           (shard_sets[i] != shard_sets[j] or j < i)
                           for j in range(len(runs)))]
        upgrade = any(storage.read(prefix + n, 0, 4) == V1_INDEX_MAGIC for n in inputs)
        if len(keep) <= 1 and len(runs) == len(keep) and not upgrade:
            for r in runs:
                r.close()
            return {"sealed": sealed, "merged": 0, "entries": sum(len(r) for r in keep),
                    "skipped_live": len(owners - dead)}
        shard_names, cols = merge_runs(keep, prefix)
        for r in runs:
            r.close()
        gen = 1 + max((int(RUN_NAME.fullmatch(n)["first"]) for n in inputs
                       if _writer_of(n) == COMPACT_ID), default=-1)
        storage.write_atomic(f"{prefix}{COMPACT_ID}-{gen:06d}.index",
                             encode_run(shard_names, cols))
        for n in inputs:
            storage.remove(prefix + n)
    return {"sealed": sealed, "merged": len(inputs), "entries": len(cols),
            "skipped_live": len(owners - dead)}
