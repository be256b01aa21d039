"""Teacher-recording mode: a CE run writes the targets a server would tee, per step."""

import json
import logging
import subprocess
import sys
import threading
import time

import pytest
import torch

from logitcast.cache import CacheReader, list_namespaces, open_storage
from logitcast.cache.steps import StepLogError, read_step_logs
from logitcast.client.offline import CacheMissError, CacheSource
from logitcast.client.teacher_client import TeacherClient
from logitcast.data.packing import PackedBatch, Packer, PackingConfig
from logitcast.ops import SparseTargets, TargetSpec
from logitcast.ops.codec import encode
from logitcast.ops.rowkey import row_key
from logitcast.server.backends import TransformersBackend
from logitcast.trainer import ConfigError, Trainer, build_student, load_config, read_log
from logitcast.trainer.record import RecordingError, TargetRecorder, record_namespace
from tests.server.conftest import ServerThread
from tests.trainer.conftest import run_config

RS12 = TargetSpec(method="sample", unique=12.0)
RUN = "teacher7"


def _config(corpora, out, cache, **overrides):
    return load_config(None, run_config(corpora, out, **{
        "steps": 3, "eval.every": 0, "export": False, "record.cache_dir": str(cache),
        "record.run": RUN, **overrides}))


@pytest.fixture(scope="module")
def recorded(corpora, tmp_path_factory):
    """A 3-step CE run recording into a cache, stopped after step 0 and resumed (the
    student's weights at step 1 exported in between): (cache, run dir, weights dir)."""
    tmp = tmp_path_factory.mktemp("recorded")
    cache, out, w1 = tmp / "cache", tmp / "run", tmp / "weights_step1"
    with Trainer(_config(corpora, out, cache, stop_at=1)) as t:
        t.run()
        t.export(w1)
    with Trainer(_config(corpora, out, cache)) as t:
        assert t.start_step == 1
        t.run()
    return cache, out, w1


def _rows(out):
    return {r["step"]: r["rows"] for r in read_log(out) if r["kind"] == "train"}


def _namespace(corpora):
    return record_namespace(RUN, tokenizer_fingerprint=corpora[0].tokenizer_fingerprint,
                            spec=RS12)


def test_records_are_the_bytes_a_teacher_server_tees_with_the_weights_of_that_step(
        recorded, corpora, tmp_path):
    cache, out, w1 = recorded
    from transformers import AutoModelForCausalLM

    ns = _namespace(corpora)
    packer = Packer(corpora[0], PackingConfig(seq_len=32, global_batch=4))
    weights = {0: build_student(preset="micro", vocab_size=corpora[0].vocab_size),
               1: AutoModelForCausalLM.from_pretrained(w1, dtype=torch.float32,
                                                       attn_implementation="sdpa")}
    mine = CacheReader(cache, ns)
    try:
        for step, model in weights.items():
            backend = TransformersBackend(model, teacher_id=ns.teacher_id,
                                          tokenizer_fingerprint=ns.tokenizer_fingerprint)
            server = ServerThread(backend, cache_dir=tmp_path / f"server{step}",
                                  replica_id="r0")
            batch = packer.batch(step)
            try:
                with TeacherClient([server.address], RS12, vocab_size=backend.vocab_size,
                                   tokenizer_fingerprint=ns.tokenizer_fingerprint) as client:
                    client.fetch(batch)
            finally:
                server.close()  # flushes the tee
            served = CacheReader(tmp_path / f"server{step}", ns)
            try:
                for key in batch.row_keys:
                    assert served.get(key) is not None
                    assert mine.get(key) == served.get(key), f"step {step}"
            finally:
                served.close()
    finally:
        mine.close()
    logged, _ = read_step_logs(open_storage(cache), ns.name)
    assert {e.step for e in logged.values()} == {0, 1, 2}
    assert sorted(logged) == sorted(bytes.fromhex(k) for rows in _rows(out).values()
                                    for k in rows)


def test_a_recorded_run_feeds_an_offline_student_exactly_its_rows_and_targets(
        recorded, corpora, tmp_path):
    cache, out, _ = recorded
    config = load_config(None, run_config(corpora, tmp_path / "student", **{
        "steps": 3, "eval.every": 0, "export": False, "teacher.source": "cache",
        "teacher.cache_dir": str(cache), "teacher.teacher_id": f"record:{RUN}",
        "loss.alpha": {"name": "constant", "value": 0.5}}))
    with Trainer(config) as t:
        t.run()
        assert t.source.served_steps == {0: 4, 1: 4, 2: 4}
    student = [r for r in read_log(tmp_path / "student") if r["kind"] == "train"]
    assert {r["step"]: r["rows"] for r in student} == _rows(out)
    assert all(r["kd"] > 0 for r in student)
    (steps,) = [r for r in read_log(tmp_path / "student") if r["kind"] == "teacher_steps"]
    assert (steps["units"], steps["min"], steps["median"], steps["max"], steps["unknown"]) == \
        (12, 0, 1, 2, 0)
    # the targets it trained on are the recorded records, decoded
    batch = Packer(corpora[0], PackingConfig(seq_len=32, global_batch=4)).batch(2)
    reader = CacheReader(cache, _namespace(corpora))
    with CacheSource(cache, _namespace(corpora)) as source:
        got = source.fetch(batch).targets
    try:
        for r, key in enumerate(batch.row_keys):
            assert encode(got[r * 32:(r + 1) * 32]) == reader.get(key)
    finally:
        reader.close()


def test_a_step_window_serves_rows_recorded_inside_it_and_names_the_step_of_others(
        recorded, corpora):
    cache, _, _ = recorded
    packer = Packer(corpora[0], PackingConfig(seq_len=32, global_batch=4))
    with CacheSource(cache, _namespace(corpora), steps=(1, 3)) as source:
        source.fetch(packer.batch(1))
        source.fetch(packer.batch(2))
        with pytest.raises(CacheMissError, match=r"row 0 .*teacher step 0, outside the "
                                                 r"window \[1, 3\)"):
            source.fetch(packer.batch(0))
        assert source.served_steps == {1: 4, 2: 4}


# ---------------------------------------------------------------------------- the recorder


def _batch(step, rows):
    return PackedBatch(step=step, input_ids=rows, labels=rows, document_ids=None,
                       row_keys=tuple(row_key(r) for r in rows))


def _head(seed, d=16, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, d, generator=g)


def _record(recorder, step, rows, head):
    recorder.step = step
    hidden = torch.randn(rows.numel(), head.shape[1], generator=torch.Generator().manual_seed(9))
    recorder(hidden, head, rows)
    return recorder.targets(hidden, head, rows)[1]


ROWS = torch.randint(2, 1000, (2, 16), generator=torch.Generator().manual_seed(3))


def _rows_at(step):
    return (ROWS + step) % 1000


def test_a_row_recorded_again_later_is_served_from_its_latest_step(tmp_path):
    with TargetRecorder(tmp_path, run="r", tokenizer_fingerprint="fp", spec=RS12) as rec:
        _record(rec, 0, ROWS, _head(0))
        latest = _record(rec, 5, ROWS, _head(1))  # still in the open shard: sealed first
        ns = rec.namespace
    with CacheSource(tmp_path, ns) as source:
        got = source.fetch(_batch(0, ROWS)).targets
        assert encode(got) == encode(latest)
        assert source.served_steps == {5: 2}
    with CacheSource(tmp_path, ns, steps=(0, 5)) as source:
        with pytest.raises(CacheMissError, match="teacher step 5"):
            source.fetch(_batch(0, ROWS))


def test_a_torn_step_log_tail_is_ignored_with_a_warning_and_truncated_on_resume(
        tmp_path, caplog):
    with TargetRecorder(tmp_path, run="r", tokenizer_fingerprint="fp", spec=RS12) as rec:
        _record(rec, 0, ROWS, _head(0))
        ns = rec.namespace
    (log,) = (tmp_path / ns.name).glob("*.steps.jsonl")
    with open(log, "ab") as f:
        f.write(b'{"step": 1, "keys": ["ab')  # a kill mid-line
    with caplog.at_level(logging.WARNING), CacheSource(tmp_path, ns) as source:
        source.fetch(_batch(0, ROWS))
        assert source.served_steps == {0: 2}
    assert "torn last entry" in caplog.text
    with TargetRecorder(tmp_path, run="r", tokenizer_fingerprint="fp", spec=RS12) as rec:
        _record(rec, 1, ROWS[:1], _head(1))
    lines = log.read_bytes().splitlines()
    assert len(lines) == 3
    assert all(json.loads(line) for line in lines)


def test_a_damaged_step_log_line_is_an_error_naming_the_file_and_line(tmp_path):
    with TargetRecorder(tmp_path, run="r", tokenizer_fingerprint="fp", spec=RS12) as rec:
        _record(rec, 0, ROWS, _head(0))
        ns = rec.namespace
    (log,) = (tmp_path / ns.name).glob("*.steps.jsonl")
    log.write_bytes(log.read_bytes() + b'{"step": "two"}\n')
    with pytest.raises(StepLogError, match=rf"{log.name} line 3"):
        CacheSource(tmp_path, ns)
    with pytest.raises(StepLogError, match="line 3"):
        TargetRecorder(tmp_path, run="r", tokenizer_fingerprint="fp", spec=RS12)


def test_a_write_error_surfaces_on_the_training_thread_naming_step_and_cause(tmp_path):
    rec = TargetRecorder(tmp_path, run="r", tokenizer_fingerprint="fp", spec=RS12)

    def broken(*a, **k):
        raise OSError("No space left on device")

    rec.writer.put = broken
    _record(rec, 3, ROWS, _head(0))
    for _ in range(500):  # until the writer thread has failed
        if rec._error is not None:
            break
        time.sleep(0.01)
    with pytest.raises(RecordingError, match=r"failed at teacher step 3: OSError: No space"):
        _record(rec, 4, ROWS, _head(0))
    rec.close()  # already raised: not again


def test_a_full_queue_holds_training_back_then_errors_naming_the_stuck_writer(tmp_path):
    rec = TargetRecorder(tmp_path, run="r", tokenizer_fingerprint="fp", spec=RS12,
                         max_queue=1, queue_timeout_s=0.3)
    release = threading.Event()
    put = rec.writer.put
    rec.writer.put = lambda *a, **k: release.wait() and put(*a, **k)
    try:
        for step in range(2):  # one taken by the stuck writer, one queued
            _record(rec, step, ROWS, _head(0))
        with pytest.raises(RecordingError, match=r"queue full for 0.3 s \(1 micro-batches"):
            _record(rec, 2, ROWS, _head(0))
    finally:
        release.set()
        rec.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_loss_hands_over_the_logits_the_recorder_would_form_itself(
        tmp_path, dtype):
    """Recording from the fused loss's chunks (5 positions each, the recorder's own 8)
    gives the bytes of the recorder's separate pass, so no second head matmul is needed."""
    from logitcast.ops import fused_distill_loss

    head = _head(0).to(dtype)
    hidden = torch.randn(ROWS.numel(), 16, generator=torch.Generator().manual_seed(9))
    hidden = hidden.to(dtype).requires_grad_()
    with TargetRecorder(tmp_path, run="r", tokenizer_fingerprint="fp", spec=RS12,
                        chunk_size=8) as rec:
        sink = rec.batch(ROWS, "cpu")
        loss, _ = fused_distill_loss(hidden, head, None, ROWS.reshape(-1), alpha=0.0,
                                     chunk_size=5, on_logits=sink)
        loss.backward()
        sink.done()
        fused = SparseTargets.cat(sink.parts)
        _, own = rec.targets(hidden.detach(), head, ROWS)
    assert encode(fused) == encode(own)
    assert rec.records == ROWS.shape[0]


def test_student_loss_records_the_same_bytes_fused_or_plain(tmp_path):
    from logitcast.trainer import student_loss

    model = build_student(preset="micro", vocab_size=1000)
    got = {}
    for fused in (True, False):
        with TargetRecorder(tmp_path / str(fused), run="r", tokenizer_fingerprint="fp",
                            spec=RS12) as rec:
            rec.step = 7
            loss, _ = student_loss(model, ROWS, ROWS, None, alpha=0.0, fused=fused,
                                   chunk_size=12, recorder=rec)
            loss.backward()
            ns = rec.namespace
        with CacheSource(tmp_path / str(fused), ns) as source:
            got[fused] = encode(source.fetch(_batch(0, ROWS)).targets)
            assert source.served_steps == {7: 2}
    assert got[True] == got[False]


def test_a_recorded_batch_refuses_chunks_out_of_order_or_missing_and_writes_nothing(tmp_path):
    head = _head(0)
    logits = torch.randn(ROWS.numel(), 16) @ head.T
    with TargetRecorder(tmp_path, run="r", tokenizer_fingerprint="fp", spec=RS12) as rec:
        sink = rec.batch(ROWS, "cpu")
        with pytest.raises(RecordingError, match="arrived after 0 of 32"):
            sink(logits[8:16], 8)
        sink(logits[:8], 0)
        with pytest.raises(RecordingError, match="recorded 8 of 32 positions"):
            sink.done()
        with pytest.raises(RecordingError, match="document mode is refused"):
            rec.batch(ROWS, "cpu", document_ids=torch.zeros_like(ROWS))
    assert rec.records == 0
    logged, _ = read_step_logs(open_storage(tmp_path), rec.namespace.name)
    assert logged == {}


KILLED = """
import os, signal, sys, time, torch
from logitcast.ops import TargetSpec
from logitcast.trainer.record import TargetRecorder
rows = torch.tensor({rows})
rec = TargetRecorder(sys.argv[1], run="r", tokenizer_fingerprint="fp",
                     spec=TargetSpec(method="sample", unique=12.0))
head = torch.randn(1000, 16)
for step in range(3):
    rec.step = step
    rec(torch.randn(rows.numel(), 16), head, (rows + step) % 1000)
while rec.records < 3 * len(rows):
    time.sleep(0.01)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_run_killed_mid_recording_leaves_a_cache_that_reads(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED.format(rows=ROWS.tolist()),
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    (ns,) = list_namespaces(open_storage(tmp_path))
    assert ns.teacher_id == "record:r"
    with CacheSource(tmp_path, ns) as source:
        for step in range(3):
            source.fetch(_batch(step, _rows_at(step)))
        assert source.served_steps == {0: 2, 1: 2, 2: 2}
    with TargetRecorder(tmp_path, run="r", tokenizer_fingerprint="fp", spec=RS12) as rec:
        _record(rec, 3, _rows_at(3), _head(0))  # the writer id is free, the open shard resumed
    with CacheSource(tmp_path, ns) as source:
        source.fetch(_batch(3, _rows_at(3)))
        assert source.served_steps == {3: 2}


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(("overrides", "message"), [
    ({"teacher.source": "online", "teacher.addresses": ["x:1"]}, "teacher.source must be none"),
    ({"data.mode": "documents"}, "record needs data.mode=rows"),
    ({"record.extras": ["nope"]}, "record.extras"),
    ({"record.spec": {"method": "bogus"}}, "record.spec"),
    ({"record.run": ""}, "record.run is empty"),
])
def test_bad_recording_config_is_refused_naming_the_key(overrides, message):
    sets = {"data.train_tokens": "t", "record.cache_dir": "c", **overrides}
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])


@pytest.mark.parametrize(("steps", "message"), [
    ([3, 1], r"0 <= lo < hi, got \[3, 1\)"), ([1], "two integers"), (["a", 2], r"\[0\] must be int"),
])
def test_a_bad_step_window_is_refused_naming_it(steps, message):
    sets = {"data.train_tokens": "t", "teacher.source": "cache", "teacher.cache_dir": "c",
            "teacher.steps": steps}
    with pytest.raises(ConfigError, match=f"teacher.steps.*{message}"):
        load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])
    with pytest.raises(ConfigError, match="needs teacher.source cache"):
        load_config(None, ['data.train_tokens="t"', "teacher.steps=[0, 2]"])
