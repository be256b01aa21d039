"""Reading format-version-1 caches: their per-shard index files.

Version 1 shards hold the same records as version 2 and are read as they are;
only the index differs: b"LCI1" | u64 count | count x (16-byte key, u64 offset,
u32 record length) | u32 crc32 of everything before it, unsorted. A reader
converts one into an in-memory run (heap O(entries) for that shard); `logitcast
cache compact` rewrites version-1 indexes as version-2 runs.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from logitcast.cache.index import Columns, IndexCorruptError

V1_INDEX_MAGIC = b"LCI1"
_HEAD = struct.Struct("<4sQ")
_ENTRY = np.dtype([("key", "S16"), ("offset", "<u8"), ("length", "<u4")])


def v1_index_columns(data: bytes, name: str) -> Columns:
    """The entries of a version-1 index file, sorted as a version-2 run."""
    if len(data) < _HEAD.size + 4:
        raise IndexCorruptError(f"{name}: shorter than a version-1 index")
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    magic, count = _HEAD.unpack_from(body)
    if magic != V1_INDEX_MAGIC or zlib.crc32(body) != crc or \
            len(body) != _HEAD.size + count * _ENTRY.itemsize:
        raise IndexCorruptError(f"{name}: version-1 index fails its checks")
    entries = np.frombuffer(body, dtype=_ENTRY, offset=_HEAD.size, count=count)
    keys = entries["key"].tobytes()
    return Columns.build([keys[i:i + 16] for i in range(0, len(keys), 16)],
                         entries["offset"], entries["length"])
