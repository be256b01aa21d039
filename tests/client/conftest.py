from pathlib import Path

from logitcast.cache import CacheReader
from logitcast.cache.records import REC_HEAD


def damage_record(root, namespace, key):
    """Flip the first payload byte of every stored copy of `key` in the cache at `root`
    (a directory); returns the first copy's Location (shard relative to root, offset)."""
    reader = CacheReader(root, namespace)
    try:
        found = reader.locations(key)
    finally:
        reader.close()
    assert found, f"{key.hex()} is not in the cache"
    for loc in found:
        with open(Path(root) / loc.shard, "r+b") as f:
            f.seek(loc.offset + REC_HEAD.size)
            byte = f.read(1)[0]
            f.seek(loc.offset + REC_HEAD.size)
            f.write(bytes([byte ^ 0xFF]))
    return found[0]
