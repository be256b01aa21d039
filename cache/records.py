"""The cache store: append-only shards of self-checking records, one writer, one reader.

Format (docs/cache-format.md is the spec):
    <root>/<namespace>/manifest.json      the namespace fields
    <root>/<namespace>/<writer>-<seq>.open   the shard a writer is appending to
    <root>/<namespace>/<writer>-<seq>.shard  a sealed shard (renamed from .open)
    <root>/<namespace>/<writer>-<seq>.index  its index, written before the seal
Shard = 16-byte header (b"LCC1", u32 version, 8 zero bytes) + records:
    b"LCR1" | u32 payload length | 16-byte key | payload | u32 crc32(length|key|payload)
Index = b"LCI1" | u64 count | count x (16-byte key, u64 offset, u32 record length) | u32 crc32.

Each record is written with one write() call, so a writer killed at any instant
leaves at most a torn tail, which its next open truncates; readers stop at the
first incomplete record of an open shard and so never see a partial one. Every
writer has its own id and shard names, so writers never touch each other's
files. No pickle: struct headers and raw codec payloads.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from logitcast.cache.namespace import KEY_BYTES, CacheNamespace

logger = logging.getLogger(__name__)

SHARD_MAGIC, RECORD_MAGIC, INDEX_MAGIC = b"LCC1", b"LCR1", b"LCI1"
FORMAT_VERSION = 1
_SHARD_HEADER = struct.Struct("<4sI8x")
_REC_HEAD = struct.Struct(f"<4sI{KEY_BYTES}s")
_CRC = struct.Struct("<I")
_INDEX_HEAD = struct.Struct("<4sQ")
_INDEX_ENTRY = struct.Struct(f"<{KEY_BYTES}sQI")
MAX_PAYLOAD = 1 << 30
MANIFEST = "manifest.json"


class CacheCorruptError(ValueError):
    """A record or index failed its checks; the message names the shard and offset."""


@dataclass(frozen=True)
class Location:
    shard: str
    offset: int
    length: int  # whole record


class LocalStorage:
    """The file operations the store needs, on a local directory. An object-store
    backend implements the same few methods; the format does not change."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    def list(self, directory: str) -> list[str]:
        d = self.root / directory
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def read(self, name: str, offset: int = 0, length: int = -1) -> bytes:
        with open(self.root / name, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def size(self, name: str) -> int:
        return (self.root / name).stat().st_size

    def write_atomic(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._sync_dir(path.parent)

    def open_append(self, name: str):
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "ab", buffering=0)

    def truncate(self, name: str, size: int) -> None:
        os.truncate(self.root / name, size)

    def rename(self, src: str, dst: str) -> None:
        os.replace(self.root / src, self.root / dst)
        self._sync_dir((self.root / dst).parent)

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    @staticmethod
    def _sync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def encode_record(key: bytes, payload: bytes) -> bytes:
    if len(key) != KEY_BYTES:
        raise ValueError(f"cache keys are {KEY_BYTES} bytes, got {len(key)}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    head = _REC_HEAD.pack(RECORD_MAGIC, len(payload), key)
    crc = zlib.crc32(payload, zlib.crc32(head[4:]))
    return head + payload + _CRC.pack(crc)


def scan_records(data: bytes, shard: str, start: int = _SHARD_HEADER.size,
                 strict: bool = True) -> Iterator[tuple[bytes, Location]]:
    """(key, location) of consecutive valid records. At the first bad or incomplete one:
    raise CacheCorruptError if strict, else stop (a torn tail)."""
    off, end = start, len(data)
    while off < end:
        problem = None
        if end - off < _REC_HEAD.size + _CRC.size:
            problem = "incomplete record header"
        else:
            magic, n, key = _REC_HEAD.unpack_from(data, off)
            total = _REC_HEAD.size + n + _CRC.size
            if magic != RECORD_MAGIC:
                problem = f"bad record magic {magic!r}"
            elif n > MAX_PAYLOAD or off + total > end:
                problem = f"record of {n} payload bytes runs past the end"
            else:
                (crc,) = _CRC.unpack_from(data, off + total - _CRC.size)
                if zlib.crc32(data[off + 4:off + total - _CRC.size]) != crc:
                    problem = "checksum mismatch"
        if problem is not None:
            if strict:
                raise CacheCorruptError(f"{shard} offset {off}: {problem}")
            return
        yield key, Location(shard, off, total)
        off += total


def check_shard_header(data: bytes, shard: str) -> None:
    if len(data) < _SHARD_HEADER.size:
        raise CacheCorruptError(f"{shard}: shorter than the shard header")
    magic, version = _SHARD_HEADER.unpack_from(data)
    if magic != SHARD_MAGIC or version != FORMAT_VERSION:
        raise CacheCorruptError(f"{shard}: not a version-{FORMAT_VERSION} cache shard")


def list_namespaces(root: str | Path) -> list[CacheNamespace]:
    """Every namespace with a readable manifest under `root`."""
    out = []
    for d in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
        m = d / MANIFEST
        if m.is_file():
            try:
                out.append(CacheNamespace.from_dict(json.loads(m.read_text())))
            except (ValueError, json.JSONDecodeError):
                logger.warning("%s: unreadable manifest, skipped", m)
    return out


def _open_namespace(storage: LocalStorage, ns: CacheNamespace, create: bool) -> str:
    directory = ns.name
    manifest = f"{directory}/{MANIFEST}"
    if storage.path(manifest).exists():
        try:
            found = CacheNamespace.from_dict(json.loads(storage.read(manifest)))
        except (ValueError, json.JSONDecodeError) as exc:
            raise CacheCorruptError(f"{manifest}: {exc}") from exc
        if found != ns:
            raise CacheCorruptError(f"{manifest} records {found}, expected {ns}")
    elif create:
        storage.write_atomic(manifest, json.dumps(ns.to_dict(), indent=1).encode())
    else:
        raise FileNotFoundError(f"no cache namespace {directory} under {storage.root}")
    return directory


# ---------------------------------------------------------------------------- writer

class CacheWriter:
    """Appends records to this writer's shards in one namespace. Thread-safe."""

    def __init__(self, root: str | Path | LocalStorage, namespace: CacheNamespace, *,
                 writer_id: str = "w0", shard_bytes: int = 256 << 20,
                 skip_existing: bool = True) -> None:
        """skip_existing: `put` ignores keys any writer already stored in the namespace
        (False only for rewriting a namespace, as `logitcast cache compact` does)."""
        if not writer_id or not writer_id.replace("_", "").isalnum():
            raise ValueError(f"writer_id must be alphanumeric (and _), got {writer_id!r}")
        self.storage = root if isinstance(root, LocalStorage) else LocalStorage(root)
        self.namespace, self.writer_id, self.shard_bytes = namespace, writer_id, shard_bytes
        self.dir = _open_namespace(self.storage, namespace, create=True)
        self._lock = threading.Lock()
        self._keys = set(CacheReader(self.storage, namespace).keys()) if skip_existing else set()
        mine = [n for n in self.storage.list(self.dir) if n.startswith(f"{writer_id}-")]
        seqs = [int(n.split("-")[1].split(".")[0]) for n in mine if n.endswith((".open", ".shard"))]
        self._seq = max(seqs, default=-1)
        self._file, self._index, self._size = None, [], 0
        if f"{writer_id}-{self._seq:06d}.open" in mine:
            self._resume_open_shard()
        self.records_written = self.bytes_written = 0

    def _name(self, suffix: str) -> str:
        return f"{self.dir}/{self.writer_id}-{self._seq:06d}.{suffix}"

    def _resume_open_shard(self) -> None:
        name = self._name("open")
        data = self.storage.read(name)
        try:
            check_shard_header(data, name)
        except CacheCorruptError:
            logger.warning("%s: unreadable header; starting the shard over", name)
            self.storage.remove(name)
            return
        good = _SHARD_HEADER.size
        for key, loc in scan_records(data, name, strict=False):
            self._index.append((key, loc.offset, loc.length))
            self._keys.add(key)
            good = loc.offset + loc.length
        if good < len(data):
            logger.warning("%s: truncating a torn tail of %d bytes", name, len(data) - good)
            self.storage.truncate(name, good)
        self._file, self._size = self.storage.open_append(name), good

    def put(self, key: bytes, payload: bytes) -> bool:
        """Append one record; False if the key is already in the namespace."""
        record = encode_record(key, payload)
        with self._lock:
            if key in self._keys:
                return False
            if self._file is None:  # a new shard appears with its header already in place
                self._seq += 1
                self.storage.write_atomic(self._name("open"),
                                          _SHARD_HEADER.pack(SHARD_MAGIC, FORMAT_VERSION))
                self._file = self.storage.open_append(self._name("open"))
                self._size, self._index = _SHARD_HEADER.size, []
            written = self._file.write(record)
            if written != len(record):
                raise OSError(f"short write to {self._name('open')}")
            self._index.append((key, self._size, len(record)))
            self._keys.add(key)
            self._size += len(record)
            self.records_written += 1
            self.bytes_written += len(record)
            if self._size >= self.shard_bytes:
                self._seal()
            return True

    def flush(self) -> None:
        """Make every record written so far durable (fsync)."""
        with self._lock:
            if self._file is not None:
                os.fsync(self._file.fileno())

    def seal(self) -> None:
        """Publish the open shard: fsync, write its index, rename .open -> .shard."""
        with self._lock:
            self._seal()

    def _seal(self) -> None:
        if self._file is None:
            return
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        body = _INDEX_HEAD.pack(INDEX_MAGIC, len(self._index)) + b"".join(
            _INDEX_ENTRY.pack(k, o, n) for k, o, n in self._index)
        self.storage.write_atomic(self._name("index"), body + _CRC.pack(zlib.crc32(body)))
        self.storage.rename(self._name("open"), self._name("shard"))
        self._index = []

    def close(self) -> None:
        self.seal()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------- reader

class CacheReader:
    """Random access by key and sequential scans over every writer's shards."""

    def __init__(self, root: str | Path | LocalStorage, namespace: CacheNamespace) -> None:
        self.storage = root if isinstance(root, LocalStorage) else LocalStorage(root)
        self.namespace = namespace
        self.dir = _open_namespace(self.storage, namespace, create=False) if self.storage.path(
            namespace.name).exists() else None
        self._where: dict[bytes, Location] = {}
        self._sealed: set[str] = set()
        self._open_seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        """Pick up shards sealed and records appended since the last look."""
        if self.dir is None:
            if not self.storage.path(self.namespace.name).exists():
                return
            self.dir = _open_namespace(self.storage, self.namespace, create=False)
        names = self.storage.list(self.dir)
        with self._lock:
            for name in names:
                stem, _, suffix = name.rpartition(".")
                full = f"{self.dir}/{name}"
                if suffix == "shard" and full not in self._sealed:
                    self._load_sealed(full, f"{self.dir}/{stem}.index", names,
                                      f"{self.dir}/{stem}.open")
                    self._sealed.add(full)
                    self._open_seen.pop(f"{self.dir}/{stem}.open", None)
                elif suffix == "open":
                    self._scan_open(full)

    def _load_sealed(self, shard: str, index: str, names: list[str], was_open: str) -> None:
        entries = None
        if index.rsplit("/", 1)[1] in names:
            data = self.storage.read(index)
            body, crc = data[:-_CRC.size], data[-_CRC.size:]
            ok = len(data) >= _INDEX_HEAD.size + _CRC.size and _CRC.unpack(crc)[0] == zlib.crc32(body)
            if ok:
                magic, count = _INDEX_HEAD.unpack_from(body)
                ok = magic == INDEX_MAGIC and len(body) == _INDEX_HEAD.size + count * _INDEX_ENTRY.size
                if ok:
                    entries = [(k, Location(shard, o, n)) for k, o, n in
                               _INDEX_ENTRY.iter_unpack(body[_INDEX_HEAD.size:])]
            if not ok:
                logger.warning("%s is corrupt; rebuilding it from %s", index, shard)
        if entries is None:
            data = self.storage.read(shard)
            check_shard_header(data, shard)
            entries = list(scan_records(data, shard, strict=False))
        for key, loc in entries:
            current = self._where.get(key)
            if current is None or current.shard == was_open:  # moved by the seal
                self._where[key] = loc

    def _scan_open(self, name: str) -> None:
        start = self._open_seen.get(name, _SHARD_HEADER.size)
        try:
            data = self.storage.read(name)
        except FileNotFoundError:  # sealed meanwhile; the .shard is picked up next refresh
            return
        if len(data) < _SHARD_HEADER.size:
            return
        check_shard_header(data, name)
        for key, loc in scan_records(data, name, start=start, strict=False):
            self._where.setdefault(key, loc)
            start = loc.offset + loc.length
        self._open_seen[name] = start

    def __contains__(self, key: bytes) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def keys(self) -> list[bytes]:
        return list(self._where)

    def get(self, key: bytes) -> bytes | None:
        """The payload for `key`, checked; None if absent; CacheCorruptError if damaged."""
        loc = self._where.get(key)
        if loc is None:
            return None
        try:
            data = self.storage.read(loc.shard, loc.offset, loc.length)
        except FileNotFoundError:  # an open shard was sealed: look again
            self.refresh()
            loc = self._where[key]
            data = self.storage.read(loc.shard, loc.offset, loc.length)
        records = list(scan_records(data, loc.shard, start=0))
        if len(records) != 1 or records[0][0] != key:
            raise CacheCorruptError(f"{loc.shard} offset {loc.offset}: record is not the one "
                                    f"indexed for this key")
        return data[_REC_HEAD.size:-_CRC.size]

    def scan(self) -> Iterator[tuple[bytes, memoryview]]:
        """Every (key, payload), shard by shard in file order (sequential reads; payloads
        are views into the shard, checked, not copied)."""
        by_shard: dict[str, list[Location]] = {}
        for loc in self._where.values():
            by_shard.setdefault(loc.shard, []).append(loc)
        for shard in sorted(by_shard):
            data = memoryview(self.storage.read(shard))
            for loc in sorted(by_shard[shard], key=lambda x: x.offset):
                rec = data[loc.offset:loc.offset + loc.length]
                (key, _), = scan_records(rec, shard, start=0)
                yield key, rec[_REC_HEAD.size:loc.length - _CRC.size]

    def verify(self, progress=lambda keys: keys) -> list[str]:
        """Re-check every shard's structure and every indexed record's checksum; one line
        per problem, naming the shard and offset. `progress` wraps the key iterable
        (e.g. a tqdm bar)."""
        self.refresh()
        problems: list[str] = []
        if self.dir is None:
            return problems
        for name in self.storage.list(self.dir):
            if name.endswith((".shard", ".open")):
                full = f"{self.dir}/{name}"
                try:
                    data = self.storage.read(full)
                    check_shard_header(data, full)
                    list(scan_records(data, full, strict=name.endswith(".shard")))
                except (CacheCorruptError, FileNotFoundError) as exc:
                    problems.append(str(exc))
        for key in progress(self.keys()):
            try:
                self.get(key)
            except CacheCorruptError as exc:
                problems.append(str(exc))
        return list(dict.fromkeys(problems))


class TargetCache:
    """get/put of encoded targets in one namespace: a reader, plus a writer if writable."""

    def __init__(self, root: str | Path, namespace: CacheNamespace, *,
                 writer_id: str | None = None, refresh_s: float = 1.0) -> None:
        self.storage = LocalStorage(root)
        self.writer = (CacheWriter(self.storage, namespace, writer_id=writer_id)
                       if writer_id else None)
        self.reader = CacheReader(self.storage, namespace)
        self._refresh_s, self._last_refresh = refresh_s, 0.0

    def get(self, key: bytes) -> bytes | None:
        if key not in self.reader:
            now = time.monotonic()
            if now - self._last_refresh < self._refresh_s:
                return None
            self._last_refresh = now
            self.reader.refresh()
        return self.reader.get(key)

    def put(self, key: bytes, payload: bytes) -> None:
        if self.writer is None:
            raise PermissionError("this TargetCache was opened read-only (no writer_id)")
        self.writer.put(key, payload)
        self._last_refresh = 0.0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
