"""logitcast.cache: the append-only, self-checking store of encoded teacher targets.

One writer and one reader mirror the format in docs/cache-format.md; nothing
else knows its byte offsets. Imported by the server (tee) and the client
(reads, and writes when no tee fills the cache).
"""

from logitcast.cache.namespace import CacheNamespace, row_key
from logitcast.cache.store import (
    CacheCorruptError,
    CacheReader,
    CacheWriter,
    LocalStorage,
    TargetCache,
    list_namespaces,
)

__all__ = ["CacheCorruptError", "CacheNamespace", "CacheReader", "CacheWriter", "LocalStorage",
           "TargetCache", "list_namespaces", "row_key"]
