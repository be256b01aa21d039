import os
import signal
import socket
import subprocess
import sys

import grpc
import pytest

from logitcast.cache import CacheCorruptError, CacheNamespace, CacheReader
from logitcast.client.dataset import DistillDataset
from logitcast.client.teacher_client import (
    MemoryTargetCache,
    TeacherClient,
    TeacherMismatchError,
    TeacherUnavailableError,
)
from logitcast.data.packing import Packer, PackingConfig
from logitcast.ops import TargetSpec
from logitcast.ops.codec import encode
from logitcast.ops.rowkey import row_key
from logitcast.server.backends import TransformersBackend
from tests.client.conftest import damage_record
from tests.data.conftest import write_corpus
from tests.server.conftest import ServerThread

SPEC = TargetSpec(method="sample", unique=8.0)


@pytest.fixture
def served(tiny_backend):
    s = ServerThread(tiny_backend)
    yield s
    s.close()


def client_for(addresses, backend, **kw):
    return TeacherClient(addresses, SPEC, tokenizer_fingerprint=backend.tokenizer_fingerprint,
                         vocab_size=backend.vocab_size, backoff_s=0.01, **kw)


def test_steps_arrive_once_in_order_aligned_and_equal_to_a_direct_fetch(served, corpus,
                                                                        tiny_backend):
    packer = Packer(corpus, PackingConfig(seq_len=32, global_batch=4, seed=1))
    with client_for([served.address], tiny_backend, prefetch=3) as client:
        got = list(client.stream(packer.batch(s) for s in range(6)))
        assert [g.batch.step for g in got] == list(range(6))
        for g in got:
            assert len(g.targets) == 4 * 32
            direct = client.fetch(packer.batch(g.batch.step)).targets
            assert encode(direct) == encode(g.targets.pad_to(direct.width))
        assert client.metrics.steps._value.get() == 6


def test_cache_serves_repeated_rows_without_the_teacher(served, corpus, tiny_backend):
    packer = Packer(corpus, PackingConfig(seq_len=32, global_batch=2))
    cache = MemoryTargetCache()
    with client_for([served.address], tiny_backend, cache=cache) as client:
        first = [s.targets for s in client.stream(packer.batch(s) for s in range(3))]
        tokens_before = served.server.metrics.tokens._value.get()
        again = list(client.stream(packer.batch(s) for s in range(3)))
        assert served.server.metrics.tokens._value.get() == tokens_before
        assert [a.cache_hits for a in again] == [2, 2, 2]
        assert [encode(a.targets) for a in again] == [encode(f) for f in first]
        assert len(cache) == 6


def test_a_damaged_disk_record_is_fetched_again_counted_and_rewritten(
        served, corpus, tiny_backend, tmp_path):
    root = tmp_path / "cache"
    ns = CacheNamespace(teacher_id=tiny_backend.teacher_id,
                        tokenizer_fingerprint=tiny_backend.tokenizer_fingerprint, spec=SPEC)
    batch = Packer(corpus, PackingConfig(seq_len=32, global_batch=2)).batch(0)
    with client_for([served.address], tiny_backend, cache=str(root)) as client:
        clean = client.fetch(batch).targets
    key = row_key(batch.input_ids[0])
    stored = read_back(root, ns, key)
    damage_record(root, ns, key)
    with pytest.raises(CacheCorruptError):
        read_back(root, ns, key)

    with client_for([served.address], tiny_backend, cache=str(root)) as client:
        got = client.fetch(batch)
        assert encode(got.targets) == encode(clean)
        assert got.cache_hits == 1
        assert client.metrics.cache_corrupt_records._value.get() == 1
    assert read_back(root, ns, key) == stored  # the re-written copy, past the damaged one


def read_back(root, ns, key):
    reader = CacheReader(root, ns)
    try:
        return reader.get(key)
    finally:
        reader.close()


def test_dataset_yields_aligned_steps(served, corpus, tiny_backend):
    packer = Packer(corpus, PackingConfig(seq_len=16, global_batch=4))
    with client_for([served.address], tiny_backend) as client:
        items = list(DistillDataset(packer, client, rank=1, world=2, start_step=5, steps=3))
    assert [i["step"] for i in items] == [5, 6, 7]
    assert items[0]["input_ids"].shape == (2, 16)
    assert len(items[0]["targets"]) == 32


def test_a_mismatched_tokenizer_or_vocab_fails_before_training(served, tiny_backend):
    with pytest.raises(TeacherMismatchError, match="tokenizer"):
        TeacherClient([served.address], SPEC, tokenizer_fingerprint="elsewhere",
                      vocab_size=tiny_backend.vocab_size)
    with pytest.raises(TeacherMismatchError, match="vocab 1000 != trainer's 32000"):
        TeacherClient([served.address], SPEC,
                      tokenizer_fingerprint=tiny_backend.tokenizer_fingerprint, vocab_size=32000)


def test_bad_requests_raise_at_once_and_a_dead_fleet_raises_after_bounded_tries(
        served, corpus, tiny_backend):
    packer = Packer(corpus, PackingConfig(seq_len=16, global_batch=2))
    bad = TeacherClient([served.address], TargetSpec(method="topk", k=5000),
                        tokenizer_fingerprint=tiny_backend.tokenizer_fingerprint,
                        vocab_size=tiny_backend.vocab_size)
    with pytest.raises(grpc.RpcError) as err:
        bad.fetch(packer.batch(0))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad.close()
    with pytest.raises(TeacherUnavailableError, match="no teacher reachable"):
        client_for([f"127.0.0.1:{free_port()}"], tiny_backend)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server_process(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "logitcast.cli.main", "serve", "--model",
                             "tiny", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=60)
    return proc


@pytest.mark.slow
def test_failover_when_a_server_dies_mid_run(tmp_path):
    teacher = TransformersBackend.tiny_random()  # what `serve --model tiny` runs
    corpus = write_corpus(tmp_path / "c", vocab=teacher.vocab_size,
                          fingerprint=teacher.tokenizer_fingerprint)
    packer = Packer(corpus, PackingConfig(seq_len=64, global_batch=4, seed=3))
    ports = [free_port(), free_port()]
    procs = [start_server_process(p) for p in ports]
    try:
        addresses = [f"127.0.0.1:{p}" for p in ports]
        with client_for(addresses[1:], teacher) as ref_client:
            reference = [encode(s.targets) for s in ref_client.stream(packer.batch(i)
                                                                      for i in range(10))]
        with client_for(addresses, teacher, prefetch=2, max_tries=4) as client:
            got = []
            for item in client.stream(packer.batch(i) for i in range(10)):
                got.append(item)
                if len(got) == 2:
                    procs[0].send_signal(signal.SIGKILL)
                    procs[0].wait(timeout=30)
            assert [g.batch.step for g in got] == list(range(10))
            assert [encode(g.targets) for g in got] == reference
            retried = sum(s.value for m in client.metrics.retries.collect() for s in m.samples
                          if s.name.endswith("_total"))
            assert retried >= 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
