"""On-disk index runs: sorted, fixed-width key -> (shard, offset, length) tables.

A run covers one or more sealed shards (a shard's own index is a run covering
it alone; merged runs cover many). It is columnar so each column is one
contiguous little-endian array that numpy memory-maps and binary-searches in
place: a reader's heap holds the mapping, not the entries.

    header  b"LCI2" | u32 version | u64 count | u32 names_len | u32 crc32(header[:20] + names)
    names   msgpack list of the covered shard file names (relative to the namespace)
    pad     zeros to a multiple of 8
    hi      u64[count]   int.from_bytes(key[:8], "big")  -- sorted ascending
    lo      u64[count]   int.from_bytes(key[8:], "big")
    offset  u64[count]   record offset in its shard
    length  u32[count]   whole record length
    shard   u32[count]   position of the shard in `names`
    fence   u64[ceil(count / 512)]   hi[0], hi[512], ...: a lookup bisects these (one
            page) first, then one 512-entry stretch of hi, so it touches ~2 pages, not ~27
    footer  u32 crc32 of the columns and fences | b"LCI2"

Entries are sorted by `hi` only (ties are scanned), which keeps merges a
stable sort of concatenated sorted runs. The header CRC is checked on open; the
column CRC is checked by `verify` and by merges (O(entries), never on a
reader's hot path). A flipped bit in a column can only make a lookup miss or
point at a record whose own key and CRC then fail: never a wrong payload.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

RUN_MAGIC = b"LCI2"
RUN_VERSION = 2
_HEAD = struct.Struct("<4sIQII")
_FOOT = struct.Struct("<I4s")
_ENTRY_BYTES = 8 + 8 + 8 + 4 + 4
_NATIVE_LE = sys.byteorder == "little"
FENCE_STRIDE = 512


class IndexCorruptError(ValueError):
    """An index run failed its checks (the message names the file)."""


def split_key(key: bytes) -> tuple[int, int]:
    return int.from_bytes(key[:8], "big"), int.from_bytes(key[8:16], "big")


def split_keys(keys: Sequence[bytes] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) uint64 columns of many 16-byte keys."""
    raw = np.frombuffer(b"".join(keys), dtype=">u8") if not isinstance(keys, np.ndarray) \
        else keys.view(">u8").reshape(-1)
    return raw[0::2].astype(np.uint64), raw[1::2].astype(np.uint64)


def join_key(hi: int, lo: int) -> bytes:
    return int(hi).to_bytes(8, "big") + int(lo).to_bytes(8, "big")


@dataclass
class Columns:
    """Index entries in memory, sorted by hi (what a run holds)."""

    hi: np.ndarray
    lo: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    shard: np.ndarray

    def __len__(self) -> int:
        return len(self.hi)

    @classmethod
    def build(cls, keys: Sequence[bytes], offsets, lengths, shard: int = 0) -> Columns:
        hi, lo = split_keys(keys) if len(keys) else (np.zeros(0, np.uint64),) * 2
        order = np.argsort(hi, kind="stable")
        n = len(hi)
        return cls(hi[order], lo[order], np.asarray(offsets, np.uint64).reshape(n)[order],
                   np.asarray(lengths, np.uint32).reshape(n)[order],
                   np.full(n, shard, np.uint32))


def encode_run(names: list[str], cols: Columns) -> bytes:
    """The bytes of a run file covering shards `names`."""
    packed = msgpack.packb(names)
    head = struct.pack("<4sIQI", RUN_MAGIC, RUN_VERSION, len(cols), len(packed))
    crc = zlib.crc32(packed, zlib.crc32(head))
    out = bytearray(head + struct.pack("<I", crc) + packed)
    out += bytes(-len(out) % 8)
    body_start = len(out)
    for col, dtype in ((cols.hi, "<u8"), (cols.lo, "<u8"), (cols.offset, "<u8"),
                       (cols.length, "<u4"), (cols.shard, "<u4")):
        out += np.ascontiguousarray(col, dtype=dtype).tobytes()
    out += np.ascontiguousarray(cols.hi[::FENCE_STRIDE], dtype="<u8").tobytes()
    out += _FOOT.pack(zlib.crc32(memoryview(out)[body_start:]), RUN_MAGIC)
    return bytes(out)


class Run:
    """One index run, memory-mapped (or over bytes already in memory)."""

    def __init__(self, name: str, buf, shard_prefix: str = "") -> None:
        """buf: a bytes-like object or a path to memory-map. shard_prefix: prepended to
        the covered names (the namespace directory)."""
        self.name = name
        if isinstance(buf, (str, Path)):
            with open(buf, "rb") as f:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) \
                    if os.fstat(f.fileno()).st_size else b""
        self._buf = buf
        mv = memoryview(buf).cast("B")
        size = len(mv)
        if size < _HEAD.size + _FOOT.size:
            raise IndexCorruptError(f"{name}: shorter than an index header")
        magic, version, count, names_len, crc = _HEAD.unpack(bytes(mv[:_HEAD.size]))
        if magic != RUN_MAGIC or version != RUN_VERSION:
            raise IndexCorruptError(f"{name}: not a version-{RUN_VERSION} index run")
        names_end = _HEAD.size + names_len
        body = names_end + (-names_end % 8)
        fences = -(-count // FENCE_STRIDE)
        if names_end > size or body + count * _ENTRY_BYTES + fences * 8 + _FOOT.size != size:
            raise IndexCorruptError(f"{name}: size {size} does not match {count} entries")
        packed = bytes(mv[_HEAD.size:names_end])
        if zlib.crc32(packed, zlib.crc32(bytes(mv[:_HEAD.size - 4]))) != crc:
            raise IndexCorruptError(f"{name}: header checksum mismatch")
        try:
            names = msgpack.unpackb(packed)
        except (ValueError, msgpack.ExtraData) as exc:
            raise IndexCorruptError(f"{name}: unreadable shard table: {exc}") from exc
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise IndexCorruptError(f"{name}: shard table is not a list of names")
        self.shards = [f"{shard_prefix}{n}" for n in names]
        self.count = count
        arr = np.frombuffer(buf, dtype=np.uint8)
        at = body
        cols, views = [], []
        for dtype, width in (("<u8", 8), ("<u8", 8), ("<u8", 8), ("<u4", 4), ("<u4", 4)):
            cols.append(arr[at:at + count * width].view(dtype))
            # scalar lookups through memoryviews give Python ints without numpy overhead
            views.append(mv[at:at + count * width].cast("Q" if width == 8 else "I")
                         if _NATIVE_LE else cols[-1])
            at += count * width
        self.hi, self.lo, self.offset, self.length, self.shard = cols
        self.fence = arr[at:at + fences * 8].view("<u8")
        views.append(mv[at:at + fences * 8].cast("Q") if _NATIVE_LE else self.fence)
        at += fences * 8
        self._views = views
        self._body = (body, at)
        self._pad = (names_end, body)
        self._arr = arr

    def __len__(self) -> int:
        return self.count

    def check(self) -> None:
        """Verify the column checksum (reads the whole run)."""
        start, end = self._body
        crc, magic = _FOOT.unpack(bytes(self._arr[end:end + _FOOT.size]))
        pad = self._arr[self._pad[0]:self._pad[1]]
        if magic != RUN_MAGIC or zlib.crc32(self._arr[start:end]) != crc or pad.any():
            raise IndexCorruptError(f"{self.name}: entry checksum mismatch")
        if self.count and (np.any(self.hi[1:] < self.hi[:-1]) or
                           int(self.shard.max()) >= len(self.shards) or
                           not np.array_equal(self.fence, self.hi[::FENCE_STRIDE])):
            raise IndexCorruptError(f"{self.name}: entries out of order or out of range")

    def find(self, hi: int, lo: int) -> tuple[str, int, int] | None:
        """(shard, offset, length) of the key, or None."""
        his, los, offsets, lengths, shards, fence = self._views
        j = bisect.bisect_left(fence, hi)  # fence[j-1] < hi <= fence[j]
        i = bisect.bisect_left(his, hi, max(0, (j - 1) * FENCE_STRIDE),
                               min(self.count, j * FENCE_STRIDE + 1))
        while i < self.count and his[i] == hi:
            if los[i] == lo:
                s = int(shards[i])
                if s >= len(self.shards):
                    return None  # a damaged entry: treated as absent
                return self.shards[s], int(offsets[i]), int(lengths[i])
            i += 1
        return None

    def columns(self) -> Columns:
        return Columns(np.asarray(self.hi), np.asarray(self.lo), np.asarray(self.offset),
                       np.asarray(self.length), np.asarray(self.shard))

    def close(self) -> None:
        self.hi = self.lo = self.offset = self.length = self.shard = self.fence = None
        self._arr = self._views = None
        if isinstance(self._buf, mmap.mmap):
            try:
                self._buf.close()
            except BufferError:  # views handed out (columns()) still use it: let gc do it
                pass
        self._buf = None


def merge_runs(runs: list[Run], shard_prefix: str = "") -> tuple[list[str], Columns]:
    """One sorted table over every input run's entries (checked first). Names are
    returned relative to the namespace (`shard_prefix` stripped)."""
    names: list[str] = []
    position: dict[str, int] = {}
    parts = []
    for run in runs:
        run.check()
        remap = np.array([position.setdefault(s, len(position)) for s in run.shards],
                         dtype=np.uint32)
        c = run.columns()
        parts.append(Columns(c.hi, c.lo, c.offset, c.length,
                             remap[c.shard] if len(c) else c.shard.copy()))
    names = [s[len(shard_prefix):] if s.startswith(shard_prefix) else s for s in position]
    if not parts:
        return names, Columns.build([], [], [])
    cat = Columns(*(np.concatenate([getattr(p, f) for p in parts])
                    for f in ("hi", "lo", "offset", "length", "shard")))
    order = np.argsort(cat.hi, kind="stable")  # timsort: linear-ish on sorted runs
    return names, Columns(cat.hi[order], cat.lo[order], cat.offset[order], cat.length[order],
                          cat.shard[order])
