import pytest
import torch

from logitcast.cache import CacheNamespace
from logitcast.client.offline import CacheMissError, CacheSource
from logitcast.client.teacher_client import TeacherClient
from logitcast.data.packing import Packer, PackingConfig
from logitcast.ops import TargetSpec
from logitcast.ops.codec import encode
from tests.server.conftest import ServerThread

SPEC = TargetSpec(method="sample", draws=64, unique=None)


def namespace(backend, spec=SPEC, document_mode=False):
    return CacheNamespace(teacher_id=backend.teacher_id,
                          tokenizer_fingerprint=backend.tokenizer_fingerprint, spec=spec,
                          document_mode=document_mode)


def online(backend, address, packer, steps, **kw):
    with TeacherClient([address], kw.pop("spec", SPEC), vocab_size=backend.vocab_size,
                       tokenizer_fingerprint=backend.tokenizer_fingerprint, **kw) as client:
        return [s.targets for s in client.stream(packer.batch(i) for i in range(steps))]


def test_a_teed_online_run_feeds_a_student_with_another_batch_size_offline(
        tmp_path, corpus, tiny_backend):
    server = ServerThread(tiny_backend, cache_dir=tmp_path / "cache", replica_id="r1")
    try:
        big = Packer(corpus, PackingConfig(seq_len=32, global_batch=4, seed=2))
        first = online(tiny_backend, server.address, big, 5)
    finally:
        server.close()  # drains the tee and seals its shards
    assert server.server.metrics.cache_records._value.get() == 20
    small = Packer(corpus, PackingConfig(seq_len=32, global_batch=2, seed=2))
    with CacheSource(tmp_path / "cache", namespace(tiny_backend)) as source:
        offline = [s.targets for s in source.stream(small.batch(i) for i in range(10))]
        for step in range(5):
            rows = [offline[2 * step], offline[2 * step + 1]]
            assert [encode(r[i * 32:(i + 1) * 32]) for r in rows for i in range(2)] == \
                [encode(first[step][i * 32:(i + 1) * 32]) for i in range(4)]
        with pytest.raises(CacheMissError, match="step 10 row 0"):
            source.fetch(small.batch(10))


def test_document_mode_cache_serves_another_seq_len(tmp_path, corpus, tiny_backend):
    server = ServerThread(tiny_backend)
    try:
        a = Packer(corpus, PackingConfig(seq_len=64, global_batch=1, mode="documents",
                                         max_document_tokens=48))
        online(tiny_backend, server.address, a, a.rows_per_epoch, cache=tmp_path / "c",
               writer_id="rank0")
    finally:
        server.close()
    b = Packer(corpus, PackingConfig(seq_len=96, global_batch=2, mode="documents",
                                     max_document_tokens=48))
    ns = namespace(tiny_backend, document_mode=True)
    with CacheSource(tmp_path / "c", ns) as source:
        got = source.fetch(b.batch(1))
    assert len(got.targets) == 2 * 96
    assert got.cache_hits >= 2


def test_sparser_specs_are_derived_from_the_cache(tmp_path, corpus, tiny_backend):
    server = ServerThread(tiny_backend, cache_dir=tmp_path / "cache")
    packer = Packer(corpus, PackingConfig(seq_len=32, global_batch=2))
    try:
        online(tiny_backend, server.address, packer, 2)
        online(tiny_backend, server.address, packer, 2, spec=TargetSpec(method="topk", k=20))
    finally:
        server.close()
    thin = TargetSpec(method="sample", draws=8, unique=None)
    with CacheSource(tmp_path / "cache", namespace(tiny_backend), spec=thin) as source:
        t = source.fetch(packer.batch(0)).targets
    assert bool((t.draws == 8).all())
    assert bool((t.counts.sum(1) == 8).all())
    topk = namespace(tiny_backend, spec=TargetSpec(method="topk", k=20))
    with CacheSource(tmp_path / "cache", topk, spec=TargetSpec(method="topk", k=5)) as source:
        full = CacheSource(tmp_path / "cache", topk).fetch(packer.batch(0)).targets
        five = source.fetch(packer.batch(0)).targets
    assert torch.equal(five.ids[:, :5], full.ids[:, :5])
    assert torch.allclose(five.tail_mass, 1 - full.weights[:, :5].sum(1), atol=1e-5)
    with pytest.raises(ValueError, match="cannot derive"):
        CacheSource(tmp_path / "cache", topk, spec=TargetSpec(method="topk", k=50))
