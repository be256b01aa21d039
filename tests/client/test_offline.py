import pytest

from logitcast.cache import CacheCorruptError, CacheNamespace
from logitcast.client.offline import CacheSource
from logitcast.client.teacher_client import TeacherClient
from logitcast.data.packing import Packer, PackingConfig
from logitcast.ops import TargetSpec
from logitcast.ops.codec import encode
from logitcast.ops.rowkey import row_key
from tests.client.conftest import damage_record
from tests.data.conftest import write_corpus
from tests.server.conftest import ServerThread

SPEC = TargetSpec(method="sample", unique=8.0)
SEQ = 32


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, tiny_backend):
    """A cache holding step 0's two rows, row 0's record damaged: (root, namespace, batch,
    clean targets of the step, the damaged record's location)."""
    tmp = tmp_path_factory.mktemp("offline")
    corpus = write_corpus(tmp / "tokens", fingerprint=tiny_backend.tokenizer_fingerprint)
    batch = Packer(corpus, PackingConfig(seq_len=SEQ, global_batch=2)).batch(0)
    server = ServerThread(tiny_backend)
    try:
        with TeacherClient([server.address], SPEC, vocab_size=tiny_backend.vocab_size,
                           tokenizer_fingerprint=tiny_backend.tokenizer_fingerprint,
                           cache=tmp / "cache") as client:
            clean = client.fetch(batch).targets
    finally:
        server.close()
    ns = namespace(tiny_backend)
    where = damage_record(tmp / "cache", ns, row_key(batch.input_ids[0]))
    return tmp / "cache", ns, batch, clean, where


def namespace(backend):
    return CacheNamespace(teacher_id=backend.teacher_id,
                          tokenizer_fingerprint=backend.tokenizer_fingerprint, spec=SPEC)


def test_a_damaged_record_is_an_error_naming_step_row_shard_and_offset(damaged):
    root, ns, batch, _, where = damaged
    with CacheSource(root, ns) as source:
        with pytest.raises(CacheCorruptError) as err:
            source.fetch(batch)
    message = str(err.value)
    assert "step 0 row 0" in message
    assert where.shard in message
    assert f"offset {where.offset}" in message
    assert (err.value.shard, err.value.offset) == (where.shard, where.offset)


def test_skip_leaves_the_damaged_unit_without_targets_and_counts_it(damaged):
    root, ns, batch, clean, _ = damaged
    with CacheSource(f"file://{root}", ns, on_corrupt="skip") as source:  # a URL root too
        got = source.fetch(batch)
        assert source.metrics.cache_corrupt_records._value.get() == 1
        assert source.metrics.cache_hits._value.get() == 1
    assert got.cache_hits == 1
    assert len(got.targets) == 2 * SEQ
    assert bool((got.targets.num_entries[:SEQ] == 0).all())
    assert bool((got.targets.tail_mass[:SEQ] == 1).all())
    assert encode(got.targets[SEQ:]) == encode(clean[SEQ:].pad_to(got.targets.width))


def test_on_corrupt_must_be_error_or_skip(damaged):
    root, ns, *_ = damaged
    with pytest.raises(ValueError, match="on_corrupt must be one of"):
        CacheSource(root, ns, on_corrupt="ignore")


def test_an_object_store_cache_is_written_online_and_read_offline(
        s3_url, tiny_backend, tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITCAST_HOME", str(tmp_path / "home"))  # staging, read-through cache
    corpus = write_corpus(tmp_path / "tokens", fingerprint=tiny_backend.tokenizer_fingerprint)
    packer = Packer(corpus, PackingConfig(seq_len=SEQ, global_batch=2))
    server = ServerThread(tiny_backend)
    try:
        with TeacherClient([server.address], SPEC, vocab_size=tiny_backend.vocab_size,
                           tokenizer_fingerprint=tiny_backend.tokenizer_fingerprint,
                           cache=s3_url) as client:
            online = [encode(s.targets) for s in client.stream(packer.batch(i) for i in range(2))]
    finally:
        server.close()
    with CacheSource(s3_url, namespace(tiny_backend)) as source:
        assert [encode(s.targets) for s in source.stream(packer.batch(i) for i in range(2))] == \
            online
