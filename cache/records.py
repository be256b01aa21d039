"""The cache's record and shard format, and namespace directories.

docs/cache-format.md is the spec. A shard is a 16-byte header (b"LCC1", u32
format version, 8 zero bytes) followed by self-checking records:
    b"LCR1" | u32 payload length | 16-byte key | payload | u32 crc32(length|key|payload)
This module knows those bytes and nothing about indexes (cache/index.py),
writers (cache/writer.py) or readers (cache/reader.py). No pickle anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from logitcast.cache.namespace import KEY_BYTES, CacheNamespace
from logitcast.cache.storage import Storage

logger = logging.getLogger(__name__)

SHARD_MAGIC, RECORD_MAGIC = b"LCC1", b"LCR1"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SHARD_HEADER = struct.Struct("<4sI8s")
REC_HEAD = struct.Struct(f"<4sI{KEY_BYTES}s")
CRC = struct.Struct("<I")
MAX_PAYLOAD = 1 << 30
MANIFEST = "manifest.json"
COMPACT_ID = "compact"  # the writer id (lock and run names) of `logitcast cache compact`
WRITER_ID = re.compile(r"[A-Za-z0-9_]{1,64}")
SHARD_NAME = re.compile(r"(?P<writer>[A-Za-z0-9_]+)-(?P<seq>\d{6,})\.(?P<suffix>open|shard)")
RUN_NAME = re.compile(r"(?P<writer>[A-Za-z0-9_]+)-(?P<first>\d{6,})(?:-(?P<last>\d{6,}))?\.index")


class CacheCorruptError(ValueError):
    """A record, shard or index failed its checks; names the file (and offset)."""

    def __init__(self, message: str, shard: str = "", offset: int = -1) -> None:
        super().__init__(message)
        self.shard, self.offset = shard, offset


@dataclass(frozen=True)
class Location:
    shard: str
    offset: int
    length: int  # whole record


def check_writer_id(writer_id: str) -> str:
    if not isinstance(writer_id, str) or not WRITER_ID.fullmatch(writer_id):
        raise ValueError(f"writer_id must be 1-64 characters of [A-Za-z0-9_], got {writer_id!r}")
    return writer_id


def default_writer_id(prefix: str = "w") -> str:
    """Unique per process: prefix, host, pid and a random suffix (a valid writer id)."""
    host = re.sub(r"\W", "_", socket.gethostname())[:24] or "host"
    return f"{prefix}_{host}_{os.getpid()}_{secrets.token_hex(3)}"


def shard_header() -> bytes:
    return SHARD_HEADER.pack(SHARD_MAGIC, FORMAT_VERSION, bytes(8))


def encode_record(key: bytes, payload: bytes) -> bytes:
    if len(key) != KEY_BYTES:
        raise ValueError(f"cache keys are {KEY_BYTES} bytes, got {len(key)}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    head = REC_HEAD.pack(RECORD_MAGIC, len(payload), key)
    crc = zlib.crc32(payload, zlib.crc32(head[4:]))
    return head + payload + CRC.pack(crc)


def record_problem(data, off: int, end: int) -> tuple[str | None, bytes, int]:
    """(problem or None, key, total length) of the record at `off` in data[:end]."""
    if end - off < REC_HEAD.size + CRC.size:
        return "incomplete record header", b"", 0
    magic, n, key = REC_HEAD.unpack_from(data, off)
    total = REC_HEAD.size + n + CRC.size
    if magic != RECORD_MAGIC:
        return f"bad record magic {bytes(magic)!r}", key, total
    if n > MAX_PAYLOAD or off + total > end:
        return f"record of {n} payload bytes runs past the end", key, total
    (crc,) = CRC.unpack_from(data, off + total - CRC.size)
    if zlib.crc32(data[off + 4:off + total - CRC.size]) != crc:
        return "checksum mismatch", key, total
    return None, key, total


def check_record(data, shard: str, offset: int, key: bytes) -> memoryview:
    """The payload of the one record in `data` (read from `shard` at `offset`), after
    checking magic, length, key and CRC; CacheCorruptError otherwise."""
    n = len(data)
    if n >= REC_HEAD.size + CRC.size:  # the common case, checked without building a message
        magic, length, found = REC_HEAD.unpack_from(data)
        view = memoryview(data)
        if magic == RECORD_MAGIC and found == key and n == REC_HEAD.size + length + CRC.size \
                and zlib.crc32(view[4:n - CRC.size]) == CRC.unpack_from(data, n - CRC.size)[0]:
            return view[REC_HEAD.size:n - CRC.size]
    problem, found, total = record_problem(data, 0, n)
    if problem is None and (found != key or total != len(data)):
        problem = "record is not the one indexed for this key"
    if problem is not None:
        raise CacheCorruptError(f"{shard} offset {offset}: {problem}", shard, offset)
    return memoryview(data)[REC_HEAD.size:total - CRC.size]


def scan_records(data, shard: str, start: int = SHARD_HEADER.size,
                 strict: bool = True) -> Iterator[tuple[bytes, Location]]:
    """(key, location) of consecutive valid records. At the first bad or incomplete one:
    raise CacheCorruptError if strict, else stop (a torn tail)."""
    off, end = start, len(data)
    while off < end:
        problem, key, total = record_problem(data, off, end)
        if problem is not None:
            if strict:
                raise CacheCorruptError(f"{shard} offset {off}: {problem}", shard, off)
            return
        yield key, Location(shard, off, total)
        off += total


def check_shard_header(data, shard: str) -> None:
    if len(data) < SHARD_HEADER.size:
        raise CacheCorruptError(f"{shard}: shorter than the shard header", shard, 0)
    magic, version, zeros = SHARD_HEADER.unpack_from(data)
    if magic != SHARD_MAGIC or version not in READABLE_VERSIONS or any(zeros):
        raise CacheCorruptError(f"{shard}: not a cache shard of format version "
                                f"{' or '.join(map(str, READABLE_VERSIONS))}", shard, 0)


def list_namespaces(storage: Storage) -> list[CacheNamespace]:
    """Every namespace with a readable manifest in `storage`."""
    out = []
    for d in storage.list(""):
        try:
            out.append(CacheNamespace.from_dict(json.loads(storage.read(f"{d}/{MANIFEST}"))))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            continue
        except (ValueError, json.JSONDecodeError):
            logger.warning("%s/%s/%s: unreadable manifest, skipped", storage.url, d, MANIFEST)
    return out


def open_namespace(storage: Storage, ns: CacheNamespace, create: bool) -> str | None:
    """The namespace's directory, after checking (or writing) its manifest; None if it
    does not exist and create is False."""
    manifest = f"{ns.name}/{MANIFEST}"
    try:
        raw = storage.read(manifest)
    except FileNotFoundError:
        if not create:
            return None
        storage.write_atomic(manifest, json.dumps(ns.to_dict(), indent=1).encode())
        return ns.name
    try:
        found = CacheNamespace.from_dict(json.loads(raw))
    except (ValueError, json.JSONDecodeError) as exc:
        raise CacheCorruptError(f"{storage.url}/{manifest}: {exc}") from exc
    if found != ns:
        raise CacheCorruptError(f"{storage.url}/{manifest} records {found}, expected {ns}")
    return ns.name
