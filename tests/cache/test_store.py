import hashlib
import multiprocessing
import os
import random
import signal
import threading
import time

import pytest

from logitcast.cache import CacheCorruptError, CacheNamespace, CacheReader, CacheWriter
from logitcast.ops import TargetSpec

NS = CacheNamespace(teacher_id="t", tokenizer_fingerprint="fp", spec=TargetSpec())


def key(i: int) -> bytes:
    return hashlib.blake2b(str(i).encode(), digest_size=16).digest()


def payload(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (1 + i % 7)


def test_round_trip_dedupe_seal_and_several_writers(tmp_path):
    with CacheWriter(tmp_path, NS, writer_id="a", shard_bytes=600) as a, \
            CacheWriter(tmp_path, NS, writer_id="b") as b:
        for i in range(20):
            assert a.put(key(i), payload(i))
        assert not a.put(key(3), b"other")
        for i in range(20, 30):
            assert b.put(key(i), payload(i))
    reader = CacheReader(tmp_path, NS)
    assert len(reader) == 30
    assert all(reader.get(key(i)) == payload(i) for i in range(30))
    assert reader.get(key(99)) is None
    assert dict(reader.scan()) == {key(i): payload(i) for i in range(30)}
    names = os.listdir(tmp_path / NS.name)
    assert sum(n.endswith(".shard") for n in names) > 2
    assert not any(n.endswith(".open") for n in names)
    assert reader.verify() == []
    manifest = tmp_path / NS.name / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"t"', '"u"'))
    with pytest.raises(CacheCorruptError, match="manifest.json records"):
        CacheReader(tmp_path, NS)


def _writer_child(root, conn, start):
    w = CacheWriter(root, NS, writer_id="k", shard_bytes=2000)
    i = start
    while True:
        w.put(key(i), payload(i))
        conn.send(i)  # acknowledged: put() returned
        i += 1


def test_writer_killed_at_30_random_points_loses_nothing_acknowledged(tmp_path):
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    acked: set[int] = set()
    start = 0
    for _ in range(30):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_writer_child, args=(tmp_path, child, start))
        proc.start()
        deadline = time.monotonic() + 20
        want = rng.randint(1, 40)
        got = 0
        while got < want and time.monotonic() < deadline:
            if parent.poll(0.05):
                acked.add(parent.recv())
                got += 1
        time.sleep(rng.random() * 0.01)  # land the kill anywhere, even mid-record
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        while parent.poll():
            acked.add(parent.recv())
        reader = CacheReader(tmp_path, NS)
        assert reader.verify() == []
        for i in acked:
            assert reader.get(key(i)) == payload(i)
        start = max(acked) + 1
    assert len(acked) >= 30
    CacheWriter(tmp_path, NS, writer_id="k").close()  # truncates any torn tail, seals
    assert CacheReader(tmp_path, NS).verify() == []


def test_flipped_bits_and_truncations_are_detected_and_never_returned(tmp_path):
    with CacheWriter(tmp_path, NS, writer_id="w", shard_bytes=10**9) as w:
        for i in range(50):
            w.put(key(i), payload(i))
    shard = next((tmp_path / NS.name).glob("*.shard"))
    clean = shard.read_bytes()
    rng = random.Random(1)
    for _ in range(100):
        data = bytearray(clean)
        pos = rng.randrange(16, len(data))
        data[pos] ^= 1 << rng.randrange(8)
        shard.write_bytes(bytes(data))
        reader = CacheReader(tmp_path, NS)
        problems = reader.verify()
        assert problems
        assert all(shard.name in p for p in problems)
        errors = []
        for i in range(50):
            try:
                assert reader.get(key(i)) == payload(i)
            except CacheCorruptError as exc:
                errors.append(str(exc))
        assert len(errors) == 1
        assert shard.name in errors[0]
    shard.write_bytes(clean[: len(clean) - 5])
    assert any("runs past the end" in p for p in CacheReader(tmp_path, NS).verify())
    shard.write_bytes(clean)
    index = next((tmp_path / NS.name).glob("*.index"))
    data = bytearray(index.read_bytes())
    data[30] ^= 0xFF
    index.write_bytes(bytes(data))
    reader = CacheReader(tmp_path, NS)  # corrupt index: rebuilt from the shard
    assert all(reader.get(key(i)) == payload(i) for i in range(50))


def test_readers_see_a_growing_set_of_complete_records_during_appends(tmp_path):
    writer = CacheWriter(tmp_path, NS, writer_id="w", shard_bytes=3000)
    done = threading.Event()

    def append():
        for i in range(300):
            writer.put(key(i), payload(i))
            if i % 10 == 0:
                time.sleep(0.001)
        writer.close()
        done.set()

    t = threading.Thread(target=append)
    t.start()
    reader = CacheReader(tmp_path, NS)
    seen = 0
    for _ in range(2000):
        reader.refresh()
        keys = reader.keys()
        assert len(keys) >= seen
        seen = len(keys)
        for k in keys[-5:]:
            assert reader.get(k) is not None
        if done.is_set() and seen == 300:
            break
        time.sleep(0.002)
    t.join(30)
    reader.refresh()
    assert len(reader) == 300
