"""logitcast.cache: the append-only, self-checking store of encoded teacher targets.

docs/cache-format.md is the spec. `records` holds the record bytes, `index` the
on-disk index runs, `writer`/`reader` the one writer and one reader, `storage`
local disk and fsspec object stores, `maintenance` verify/repair/compact, and
`store` the get/put view a client uses. Imported by the server (tee) and the
client (reads, and writes when no tee fills the cache).
"""

from logitcast.cache.namespace import CacheNamespace, row_key
from logitcast.cache.reader import CacheReader
from logitcast.cache.records import CacheCorruptError, default_writer_id, list_namespaces
from logitcast.cache.storage import (
    FsspecStorage,
    LocalStorage,
    Storage,
    WriterIdInUseError,
    open_storage,
)
from logitcast.cache.store import TargetCache
from logitcast.cache.writer import CacheWriter

__all__ = ["CacheCorruptError", "CacheNamespace", "CacheReader", "CacheWriter", "FsspecStorage",
           "LocalStorage", "Storage", "TargetCache", "WriterIdInUseError", "default_writer_id",
           "list_namespaces", "open_storage", "row_key"]
