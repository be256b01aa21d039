import random

import numpy as np
import pytest

from logitcast.cache.index import (
    FENCE_STRIDE,
    Columns,
    IndexCorruptError,
    Run,
    encode_run,
    join_key,
    merge_runs,
)


def _keys(rng, n, distinct_hi):
    """Keys whose first 8 bytes repeat in long stretches (ties across fence strides)."""
    return [join_key(rng.randrange(distinct_hi) * 7919, rng.getrandbits(64)) for _ in range(n)]


@pytest.mark.parametrize(("n", "distinct_hi"), [(0, 1), (1, 1), (511, 50), (513, 3),
                                                (5000, 4), (5000, 5000), (3 * FENCE_STRIDE, 1)])
def test_find_returns_every_key_and_nothing_else(tmp_path, n, distinct_hi):
    rng = random.Random(n + distinct_hi)
    keys = _keys(rng, n, distinct_hi)
    cols = Columns.build(keys, np.arange(n) * 10, np.arange(n) % 97 + 1)
    path = tmp_path / "r.index"
    path.write_bytes(encode_run(["a.shard"], cols))
    run = Run("r.index", path, "ns/")
    run.check()
    for i, k in enumerate(keys):
        hi, lo = int.from_bytes(k[:8], "big"), int.from_bytes(k[8:], "big")
        assert run.find(hi, lo) == ("ns/a.shard", i * 10, i % 97 + 1)
    for k in _keys(random.Random(-1), 200, distinct_hi + 3):
        hi, lo = int.from_bytes(k[:8], "big"), int.from_bytes(k[8:], "big")
        assert run.find(hi, lo) is None or k in keys


def test_merge_keeps_every_entry_and_maps_shards(tmp_path):
    rng = random.Random(5)
    runs, expect = [], {}
    for r in range(3):
        keys = _keys(rng, 700, 40)
        cols = Columns.build(keys, np.arange(700) + 1000 * r, np.full(700, 5))
        runs.append(Run(f"r{r}", encode_run([f"s{r}.shard"], cols), "ns/"))
        expect.update({k: (f"ns/s{r}.shard", i + 1000 * r, 5) for i, k in enumerate(keys)})
    names, cols = merge_runs(runs, "ns/")
    merged = Run("m", encode_run(names, cols), "ns/")
    merged.check()
    assert len(merged) == 2100
    for k, where in expect.items():
        assert merged.find(int.from_bytes(k[:8], "big"), int.from_bytes(k[8:], "big")) == where


def test_a_damaged_fence_is_caught_by_check(tmp_path):
    keys = _keys(random.Random(1), 2000, 2000)
    data = bytearray(encode_run(["a.shard"], Columns.build(keys, np.arange(2000),
                                                            np.ones(2000))))
    data[-9] ^= 0x40  # inside the last fence entry
    with pytest.raises(IndexCorruptError, match="checksum"):
        Run("r", bytes(data), "").check()
