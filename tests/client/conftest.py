from pathlib import Path

import numpy as np

from logitcast.cache import CacheReader
from logitcast.cache.records import REC_HEAD
from logitcast.client.shards import ShardWriter, TokenCorpus


def write_corpus(directory, vocab=1000, docs=60, seed=0, fingerprint="fp", eos=1):
    rng = np.random.default_rng(seed)
    w = ShardWriter(directory, fingerprint, vocab, eos, shard_tokens=500)
    for i in range(docs):
        w.add(rng.integers(2, vocab, size=int(rng.integers(5, 120))))
        w.commit_source(f"doc-{i}")
    w.flush()
    return TokenCorpus(directory)


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
