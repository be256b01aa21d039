from __future__ import annotations

import numpy as np

from logitcast.data.shards import ShardWriter, TokenCorpus


def write_corpus(directory, vocab=1000, docs=60, seed=0, fingerprint="fp", eos=1):
    rng = np.random.default_rng(seed)
    w = ShardWriter(directory, fingerprint, vocab, eos, shard_tokens=500)
    for i in range(docs):
        w.add(rng.integers(2, vocab, size=int(rng.integers(5, 120))))
        w.commit_source(f"doc-{i}")
    w.flush()
    return TokenCorpus(directory)
