import hashlib
import multiprocessing
import os
import random
import signal
import struct
import threading
import time
import zlib

import pytest

from logitcast.cache import (
    CacheCorruptError,
    CacheNamespace,
    CacheReader,
    CacheWriter,
    TargetCache,
    WriterIdInUseError,
    open_storage,
)
from logitcast.cache.maintenance import compact, verify
from logitcast.ops import TargetSpec

NS = CacheNamespace(teacher_id="t", tokenizer_fingerprint="fp", spec=TargetSpec())
FORK = multiprocessing.get_context("fork")


def key(i: int) -> bytes:
    return hashlib.blake2b(str(i).encode(), digest_size=16).digest()


def payload(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (1 + i % 7)


def files(root, suffix):
    return sorted((root / NS.name).glob(f"*{suffix}"))


def test_round_trip_dedupe_seal_merge_and_several_writers(tmp_path):
    with CacheWriter(tmp_path, NS, writer_id="a", shard_bytes=600, merge_fanout=3) as a, \
            CacheWriter(tmp_path, NS, writer_id="b") as b:
        for i in range(60):
            assert a.put(key(i), payload(i))
        assert not a.put(key(3), b"other")  # already sealed into a run
        assert not a.put(key(59), b"other")  # still in the open shard
        for i in range(60, 70):
            assert b.put(key(i), payload(i))
    reader = CacheReader(tmp_path, NS)
    assert all(reader.get(key(i)) == payload(i) for i in range(70))
    assert reader.get(key(99)) is None
    assert {k: bytes(v) for k, v in reader.scan()} == {key(i): payload(i) for i in range(70)}
    assert sorted(reader.iter_keys()) == sorted(key(i) for i in range(70))
    assert len(files(tmp_path, ".shard")) > 9
    assert not files(tmp_path, ".open")
    # a's level-0 runs were merged (fanout 3): far fewer runs than shards
    assert len(files(tmp_path, ".index")) < len(files(tmp_path, ".shard")) // 2
    assert verify(tmp_path, NS) == []
    manifest = tmp_path / NS.name / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"t"', '"u"'))
    with pytest.raises(CacheCorruptError, match="manifest.json records"):
        CacheReader(tmp_path, NS)


def test_bad_writer_ids_and_sizes_are_refused(tmp_path):
    for bad in ("trainer-rank0", "", "a/b", "x" * 65):
        with pytest.raises(ValueError, match="writer_id"):
            CacheWriter(tmp_path, NS, writer_id=bad)
    with pytest.raises(ValueError, match="shard_bytes"):
        CacheWriter(tmp_path, NS, writer_id="ok", shard_bytes=10)
    a, b = CacheWriter(tmp_path, NS), CacheWriter(tmp_path, NS)  # unique default ids
    assert a.writer_id != b.writer_id
    a.close()
    b.close()


def _hold_writer(root, writer_id, ready, stop):
    with CacheWriter(root, NS, writer_id=writer_id) as w:
        w.put(key(0), payload(0))
        ready.set()
        stop.wait(30)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_process_with_the_same_writer_id_fails_at_once(tmp_path, where, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_url")
    ready, stop = FORK.Event(), FORK.Event()
    proc = FORK.Process(target=_hold_writer, args=(root, "same", ready, stop))
    proc.start()
    try:
        assert ready.wait(30)
        with pytest.raises(WriterIdInUseError, match="same"):
            CacheWriter(root, NS, writer_id="same")
        CacheWriter(root, NS, writer_id="other").close()  # other ids are unaffected
    finally:
        stop.set()
        proc.join(30)
    with CacheWriter(root, NS, writer_id="same") as w:  # released on exit
        assert not w.put(key(0), payload(0))


def _writer_child(root, conn, start, shard_bytes):
    w = CacheWriter(root, NS, writer_id="k", shard_bytes=shard_bytes)
    i = start
    while True:
        w.put(key(i), payload(i))
        conn.send(i)  # acknowledged: put() returned
        i += 1


def _assert_never_wrong(reader, upto, rng):
    """A sample: the newest records (where a torn tail would be) and random older ones."""
    for i in {*range(max(0, upto - 12), upto), *rng.sample(range(upto), min(upto, 12))}:
        got = reader.get(key(i))
        assert got is None or got == payload(i)


@pytest.mark.parametrize(("where", "kills"), [("local", 50), ("s3", 20)])  # s3: ~1.3 s a kill
def test_writer_killed_at_random_points_loses_nothing(tmp_path, where, kills, request):
    """Local: every acknowledged record stays readable after each kill (readers tail the
    open shard). Object store: nothing sealed is ever lost, and the next writer with the
    same id resumes the staged shard, so once it seals every acknowledged record is there."""
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_url")
    rng = random.Random(0)
    acked: set[int] = set()
    sealed_before: set[bytes] = set()
    start = 0
    storage = open_storage(root)  # one client for the checks (each new one costs ~0.5 s on s3)
    for _ in range(kills):
        parent, child = FORK.Pipe(duplex=False)
        proc = FORK.Process(target=_writer_child,  # s3: fewer seals (each ~10 slow requests)
                            args=(root, child, start, 1500 if where == "local" else 8000))
        proc.start()
        want, got, deadline = rng.randint(1, 30), 0, time.monotonic() + 30
        while got < want and time.monotonic() < deadline:
            if parent.poll(0.05):
                acked.add(parent.recv())
                got += 1
        time.sleep(rng.random() * 0.005)  # land the kill anywhere, even mid-record
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        while parent.poll():
            acked.add(parent.recv())
        reader = CacheReader(storage, NS)
        _assert_never_wrong(reader, max(acked) + 5, rng)
        visible = set(reader.iter_keys())
        assert sealed_before <= visible  # nothing once visible is lost
        if where == "local":  # cheap here: every acknowledged record, every round
            assert all(reader.get(key(i)) == payload(i) for i in acked)
        sealed_before = visible
        reader.close()
        start = max(acked) + 1
    assert len(acked) >= kills
    CacheWriter(root, NS, writer_id="k").close()  # resumes, truncates any torn tail, seals
    reader = CacheReader(root, NS)
    assert all(reader.get(key(i)) == payload(i) for i in acked)
    assert verify(root, NS) == []


def test_1000_random_bit_flips_in_shards_and_indexes_are_all_detected(tmp_path):
    with CacheWriter(tmp_path, NS, writer_id="w", shard_bytes=1200, merge_fanout=2) as w:
        for i in range(40):
            w.put(key(i), payload(i))
    targets = files(tmp_path, ".shard") + files(tmp_path, ".index")
    clean = {p: p.read_bytes() for p in targets}
    rng = random.Random(1)
    outcomes, errors = {"ok": 0, "miss": 0, "error": 0}, []
    for _ in range(1000):
        path = rng.choice(targets)
        data = bytearray(clean[path])
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        problems = verify(tmp_path, NS)
        assert problems, f"a flip in {path.name} went unnoticed"
        reader = CacheReader(tmp_path, NS)
        for i in range(40):  # a damaged file gives a miss or an error, never other bytes
            try:
                got = reader.get(key(i))
            except CacheCorruptError as exc:
                errors.append(exc)
                outcomes["error"] += 1
                continue
            outcomes["ok" if got == payload(i) else "miss"] += 1
            assert got is None or got == payload(i)
        reader.close()
        path.write_bytes(clean[path])
    assert outcomes["error"] > 0
    assert outcomes["ok"] > 0
    assert all(e.shard.endswith(".shard") and e.offset >= 0 for e in errors)  # named


def test_verify_repair_quarantines_damaged_shards_and_salvages_the_rest(tmp_path):
    with CacheWriter(tmp_path, NS, writer_id="w", shard_bytes=10**6) as w:
        for i in range(30):
            w.put(key(i), payload(i))
    shard = files(tmp_path, ".shard")[0]
    data = bytearray(shard.read_bytes())
    data[400] ^= 0x10  # inside one record
    shard.write_bytes(bytes(data))
    (tmp_path / NS.name / "w-000000.index").write_bytes(b"junk")
    problems = verify(tmp_path, NS, repair=True)
    assert any(shard.name in p for p in problems)
    assert (tmp_path / NS.name / "quarantine" / shard.name).exists()
    assert verify(tmp_path, NS) == []
    reader = CacheReader(tmp_path, NS)
    readable = [i for i in range(30) if reader.get(key(i)) == payload(i)]
    assert len(readable) == 29  # everything but the damaged record


def _five_records_the_last_damaged(root):
    with CacheWriter(root, NS, writer_id="w") as w:
        for i in range(5):
            w.put(key(i), payload(i))
    shard = files(root, ".shard")[0]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 1  # the last record's payload
    shard.write_bytes(bytes(data))
    return shard


def test_target_cache_treats_a_damaged_record_as_a_miss_and_rewrites_it(tmp_path):
    shard = _five_records_the_last_damaged(tmp_path)
    seen = []
    cache = TargetCache(tmp_path, NS, writable=True, writer_id="c", on_corrupt=seen.append)
    assert cache.get(key(4)) is None
    assert cache.corrupt_records == 1
    assert shard.name in str(seen[0])
    assert cache.get(key(3)) == payload(3)
    cache.put(key(4), payload(4))  # re-written despite the key being indexed
    assert cache.get(key(4)) == payload(4)
    cache.close()
    assert CacheReader(tmp_path, NS).get(key(4)) == payload(4)


def _compact_forever(root):
    while True:
        compact(root, NS)


def test_compaction_killed_at_random_points_loses_nothing(tmp_path):
    rng = random.Random(2)
    n = 0
    for round_ in range(25):
        with CacheWriter(tmp_path, NS, writer_id=f"w{round_ % 4}", shard_bytes=700,
                         merge_fanout=3) as w:
            for _ in range(12):
                w.put(key(n), payload(n))
                n += 1
        proc = FORK.Process(target=_compact_forever, args=(str(tmp_path),))
        proc.start()
        time.sleep(rng.random() * 0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        reader = CacheReader(tmp_path, NS)
        assert all(reader.get(key(i)) == payload(i) for i in range(n))
        reader.close()
    compact(tmp_path, NS)
    assert verify(tmp_path, NS) == []
    assert len(files(tmp_path, ".index")) == 1


def test_compaction_leaves_a_live_writers_files_alone(tmp_path):
    with CacheWriter(tmp_path, NS, writer_id="old", shard_bytes=500) as w:
        for i in range(20):
            w.put(key(i), payload(i))
    live = CacheWriter(tmp_path, NS, writer_id="live", shard_bytes=500)
    for i in range(20, 40):
        live.put(key(i), payload(i))
    before = {p.name: p.read_bytes() for p in (tmp_path / NS.name).iterdir()
              if p.name.startswith("live-")}
    assert any(n.endswith(".open") for n in before)
    done = compact(tmp_path, NS)
    assert done["skipped_live"] == 1
    assert done["merged"] > 0
    after = {p.name: p.read_bytes() for p in (tmp_path / NS.name).iterdir()
             if p.name.startswith("live-")}
    assert after == before
    for i in range(40, 50):  # the live writer carries on and seals
        live.put(key(i), payload(i))
    live.close()
    reader = CacheReader(tmp_path, NS)
    assert all(reader.get(key(i)) == payload(i) for i in range(50))


def test_compaction_seals_a_dead_writers_open_shard(tmp_path):
    parent, child = FORK.Pipe(duplex=False)
    proc = FORK.Process(target=_writer_child, args=(str(tmp_path), child, 0, 10**6))
    proc.start()
    acked = {parent.recv() for _ in range(10)}
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert files(tmp_path, ".open")
    assert compact(tmp_path, NS)["sealed"] == 1
    assert not files(tmp_path, ".open")
    reader = CacheReader(tmp_path, NS)
    assert all(reader.get(key(i)) == payload(i) for i in acked)


def _write_v1_cache(root, n):
    d = root / NS.name
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(__import__("json").dumps(NS.to_dict()))
    shard, entries = bytearray(struct.pack("<4sI8x", b"LCC1", 1)), []
    for i in range(n):
        head = struct.pack("<4sI16s", b"LCR1", len(payload(i)), key(i))
        crc = zlib.crc32(payload(i), zlib.crc32(head[4:]))
        record = head + payload(i) + struct.pack("<I", crc)
        entries.append(struct.pack("<16sQI", key(i), len(shard), len(record)))
        shard += record
    (d / "old-000000.shard").write_bytes(bytes(shard))
    body = struct.pack("<4sQ", b"LCI1", n) + b"".join(entries)
    (d / "old-000000.index").write_bytes(body + struct.pack("<I", zlib.crc32(body)))


def test_a_version_1_cache_is_read_and_compaction_upgrades_its_index(tmp_path):
    _write_v1_cache(tmp_path, 25)
    reader = CacheReader(tmp_path, NS)
    assert all(reader.get(key(i)) == payload(i) for i in range(25))
    assert verify(tmp_path, NS) == []
    compact(tmp_path, NS)
    assert [p.read_bytes()[:4] for p in files(tmp_path, ".index")] == [b"LCI2"]
    reader = CacheReader(tmp_path, NS)
    assert all(reader.get(key(i)) == payload(i) for i in range(25))


class CountingStorage:
    """A LocalStorage that counts reads (instrumentation, not a stand-in)."""

    def __init__(self, root):
        from logitcast.cache import LocalStorage

        self.inner, self.reads, self.bytes = LocalStorage(root), 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read(self, *a, **kw):
        self.reads += 1
        data = self.inner.read(*a, **kw)
        self.bytes += len(data)
        return data


def test_reads_in_write_order_are_served_from_readahead_blocks(tmp_path):
    with CacheWriter(tmp_path, NS, writer_id="w", shard_bytes=10**7) as w:
        for i in range(2000):
            w.put(key(i), payload(i))
    storage = CountingStorage(tmp_path)
    reader = CacheReader(storage, NS, readahead_bytes=1 << 16)
    storage.reads = 0
    assert all(reader.get(key(i)) == payload(i) for i in range(2000))
    assert storage.reads < 2000 // 20
    storage.reads = storage.bytes = 0
    order = list(range(2000))
    random.Random(3).shuffle(order)
    assert all(reader.get(key(i)) == payload(i) for i in order)  # random: no readahead
    assert storage.bytes <= sum(len(payload(i)) + 28 for i in range(2000))


def test_a_reader_holds_runs_not_records_once_shards_are_sealed(tmp_path):
    with CacheWriter(tmp_path, NS, writer_id="w", shard_bytes=300, merge_fanout=4) as w:
        for i in range(300):
            w.put(key(i), payload(i))
    reader = CacheReader(tmp_path, NS)
    assert len(files(tmp_path, ".shard")) > 100
    assert len(reader._runs) <= 3 * 4  # tiers x (fanout - 1)
    assert not reader._open
    assert all(reader.get(key(i)) == payload(i) for i in range(300))


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
        keys = list(reader.iter_keys())
        assert len(set(keys)) >= seen
        seen = len(set(keys))
        for k in keys[-5:]:
            assert reader.get(k) is not None
        if done.is_set() and seen == 300:
            break
        time.sleep(0.002)
    t.join(30)
    reader.refresh()
    assert len(set(reader.iter_keys())) == 300


def test_object_store_round_trip_merge_compact_and_verify(s3_url):
    with CacheWriter(s3_url, NS, writer_id="a", shard_bytes=2500, merge_fanout=3) as w:
        for i in range(60):
            assert w.put(key(i), payload(i))
        cache = TargetCache(s3_url, NS)
        assert cache.get(key(59)) is None or cache.get(key(59)) == payload(59)
    reader = CacheReader(s3_url, NS)
    assert all(reader.get(key(i)) == payload(i) for i in range(60))
    assert {k: bytes(v) for k, v in reader.scan()} == {key(i): payload(i) for i in range(60)}
    assert compact(s3_url, NS)["merged"] > 1
    assert verify(s3_url, NS) == []
    assert all(CacheReader(s3_url, NS).get(key(i)) == payload(i) for i in range(60))


def test_a_writer_replaces_a_damaged_stored_record_instead_of_skipping_it(tmp_path):
    _five_records_the_last_damaged(tmp_path)
    with CacheWriter(tmp_path, NS, writer_id="tee") as tee:  # e.g. a server's cache tee
        assert not tee.put(key(3), payload(3))  # intact: skipped
        assert tee.put(key(4), payload(4))  # damaged: written again
    assert CacheReader(tmp_path, NS).get(key(4)) == payload(4)


def _named_writer_child(root, conn, writer_id):
    w = CacheWriter(root, NS, writer_id=writer_id, shard_bytes=10**6)
    for i in range(1000):
        w.put(key(i), payload(i))
        conn.send(i)


def test_a_new_object_store_writer_publishes_a_dead_writers_staged_shard(s3_url):
    parent, child = FORK.Pipe(duplex=False)
    proc = FORK.Process(target=_named_writer_child, args=(s3_url, child, "crashed"))
    proc.start()
    acked = {parent.recv() for _ in range(15)}
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert CacheReader(s3_url, NS).get(key(0)) is None  # staged locally, not yet published
    CacheWriter(s3_url, NS, writer_id="successor").close()  # another id: adopts the orphan
    reader = CacheReader(s3_url, NS)
    assert all(reader.get(key(i)) == payload(i) for i in acked)
