import pytest
import torch

from logitcast.cache import CacheCorruptError, CacheNamespace, CacheWriter
from logitcast.cache.steps import StepLogWriter, payload_digest
from logitcast.client.offline import CacheMissError, CacheSource
from logitcast.client.teacher_client import TeacherClient
from logitcast.data.packing import PackedBatch, Packer, PackingConfig
from logitcast.ops import SparseTargets, TargetSpec
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


# ---------------------------------------------------------------------------- teacher steps


def test_a_step_window_needs_a_recorded_namespace_and_a_valid_window(damaged):
    root, ns, *_ = damaged
    with pytest.raises(ValueError, match=r"no step logs .*window \[0, 5\) cannot apply"):
        CacheSource(root, ns, steps=(0, 5))
    with pytest.raises(ValueError, match=r"0 <= lo < hi, got \[5, 5\)"):
        CacheSource(root, ns, steps=(5, 5))
    with pytest.raises(ValueError, match="two integers"):
        CacheSource(root, ns, steps=(1,))


def test_recorded_steps_are_reported_and_a_row_without_one_is_outside_every_window(tmp_path):
    """Row 0 has its step-log entry (step 7); row 1's record was written but a kill came
    before its line: served without a step, never inside a window."""
    rows = torch.arange(2 * SEQ).view(2, SEQ) + 2
    batch = PackedBatch(step=3, input_ids=rows, labels=rows, document_ids=None,
                        row_keys=tuple(row_key(r) for r in rows))
    ns = CacheNamespace(teacher_id="record:r", tokenizer_fingerprint="fp", spec=SPEC)
    payload = encode(SparseTargets.empty(SEQ, 1000))
    with CacheWriter(tmp_path, ns, writer_id="record_rank0") as writer:
        for key in batch.row_keys:
            writer.put(key, payload)
        log = StepLogWriter(tmp_path / writer.dir, writer_id="record_rank0", run="r")
        log.append(7, batch.row_keys[:1], [payload_digest(payload)])
        log.close()
    with CacheSource(tmp_path, ns) as source:
        source.fetch(batch)
        assert source.served_steps == {7: 1, None: 1}
        assert source.runs == {"r"}
    with CacheSource(tmp_path, ns, steps=(0, 8)) as source:
        with pytest.raises(CacheMissError, match=r"step 3 row 1 .*unknown: no step-log entry"):
            source.fetch(batch)
    with CacheSource(tmp_path, ns, steps=(0, 7)) as source:
        with pytest.raises(CacheMissError, match=r"step 3 row 0 .*teacher step 7, outside"):
            source.fetch(batch)
