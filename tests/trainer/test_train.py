"""The trainer for real: DeepSpeed on gloo, a loopback teacher server, its cache."""

import json
import os
import urllib.request
from pathlib import Path

import pytest
import torch

from logitcast.cache import CacheReader, list_namespaces, open_storage
from logitcast.trainer import Trainer, load_config, read_log
from tests.trainer.conftest import run_config, torchrun

pytestmark = pytest.mark.slow


def _losses(log):
    return [(r["step"], r["loss"], r["lm"], r["kd"], r["rows"]) for r in log
            if r["kind"] == "train"]


def _evals(log):
    return [r for r in log if r["kind"] == "eval"]


def test_two_ranks_online_then_from_cache_give_identical_losses(corpora, teacher, tmp_path):
    cache = tmp_path / "cache"
    common = {"teacher.spec": {"method": "sample", "unique": 12.0}, "data.micro_batch": 1,
              "deepspeed": {"zero_optimization": {"stage": 2}}, "loss.kd": "kl"}
    online = torchrun(run_config(corpora, tmp_path / "online", **common, **{
        "teacher.source": "online", "teacher.addresses": [teacher.address]}))
    assert online.returncode == 0, online.stdout + online.stderr
    assert "2 rank(s), targets from online" in online.stdout
    teacher.call(teacher.server.drain(5.0))  # flushes the tee into the cache
    offline = torchrun(run_config(corpora, tmp_path / "offline", **common, **{
        "teacher.source": "cache", "teacher.cache_dir": str(cache)}))
    assert offline.returncode == 0, offline.stdout + offline.stderr
    a, b = read_log(tmp_path / "online"), read_log(tmp_path / "offline")
    assert len(_losses(a)) == 4
    assert _losses(a) == _losses(b)
    assert all(r[3] > 0 for r in _losses(a))  # the KD term was live
    assert _evals(a) == _evals(b)
    assert len(_evals(a)) == 3
    assert _evals(a)[-1]["kl_to_teacher"] is not None
    # Both ranks trained: rank 0 logs its own rows, two of the step's four.
    assert len(_losses(a)[0][4]) == 2


def _in_process(corpora, out, teacher, **overrides):
    return load_config(None, run_config(corpora, out, **{
        "teacher.source": "online", "teacher.addresses": [teacher.address], **overrides}))


def test_online_run_with_write_cache_stores_every_row_it_trained_on(corpora, teacher, tmp_path):
    """The client writes the cache itself (no tee in front of this one), as a writer id
    unique to this rank and process."""
    cache = tmp_path / "client_cache"
    with Trainer(_in_process(corpora, tmp_path / "run", teacher, steps=2, export=False, **{
            "eval.every": 0, "teacher.cache_dir": str(cache), "teacher.write_cache": True})) as t:
        t.run()
    rows = {bytes.fromhex(k) for r in _losses(read_log(tmp_path / "run")) for k in r[4]}
    assert len(rows) == 2 * 4
    (ns,) = list_namespaces(open_storage(cache))
    reader = CacheReader(cache, ns)
    try:
        assert all(reader.get(k) is not None for k in rows)
        assert len(reader) == len(rows)
    finally:
        reader.close()
    shards = list((cache / ns.name).glob("*.shard"))
    assert shards
    assert all(p.name.startswith("trainer_rank0_") for p in shards)


def test_resumed_run_repeats_rows_targets_and_losses_exactly(corpora, teacher, tmp_path):
    ds = {"deepspeed": {"zero_optimization": {"stage": 1}}, "steps": 6, "save_every": 2,
          "loss.alpha": {"name": "wsd", "peak": 0.9, "warmup_steps": 1, "decay_steps": 2}}
    with Trainer(_in_process(corpora, tmp_path / "whole", teacher, **ds)) as t:
        t.run()
    with Trainer(_in_process(corpora, tmp_path / "parts", teacher, stop_at=3, **ds)) as t:
        t.run()
    first = read_log(tmp_path / "parts")
    assert max(r[0] for r in _losses(first)) == 2
    assert not (tmp_path / "parts" / "student").exists()  # not finished: no export
    with Trainer(_in_process(corpora, tmp_path / "parts", teacher, **ds)) as t:
        assert t.start_step == 3
        t.run()
    whole, parts = read_log(tmp_path / "whole"), read_log(tmp_path / "parts")
    assert _losses(whole) == _losses(parts)
    assert _evals(whole) == _evals(parts)


def test_exported_student_reloads_in_plain_transformers_with_the_same_logits(
        corpora, teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    config = _in_process(corpora, tmp_path / "run", teacher, metrics_port=0)
    with Trainer(config) as t:
        final = t.run()
        ids = t.packer.batch(0).input_ids
        with torch.no_grad():
            ours = t.engine.module.student(ids).logits
        body = urllib.request.urlopen(f"http://127.0.0.1:{t.metrics_port}/metrics",
                                      timeout=10).read().decode()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    with torch.no_grad():
        theirs = reloaded(ids).logits
    assert torch.equal(ours, theirs)
    meta = json.loads((tmp_path / "run" / "student" / "logitcast.json").read_text())
    assert meta["teacher_source"] == "online"
    assert meta["steps"] == 4
    assert final["kl_to_teacher"] is not None
    assert 0 <= final["top1_agreement"] <= 1
    for name in ("logitcast_trainer_tokens_total 512.0", "logitcast_trainer_loss{part=\"kd\"}",
                 "logitcast_client_wait_seconds_total", "logitcast_trainer_alpha 0.5",
                 "logitcast_trainer_eval{metric=\"ece\"}"):
        assert name in body


def test_zero3_run_exports_a_whole_student(corpora, teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    from logitcast.trainer.objective import evaluate_batch, summarize

    config = _in_process(corpora, tmp_path / "z3", teacher,
                         deepspeed={"zero_optimization": {"stage": 3}})
    with Trainer(config) as t:
        final = t.run()
        batch, targets = t.eval_rows[0]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "z3" / "student")
    again = summarize(evaluate_batch(reloaded, batch.input_ids, batch.labels, targets))
    assert again["lm_loss"] == pytest.approx(final["lm_loss"], rel=1e-5)


def test_cli_reports_config_errors_and_exits_2(tmp_path, capsys):
    from logitcast.cli.main import main

    bad = tmp_path / "run.yaml"
    bad.write_text("data: {train_tokens: /x}\nloss: {kd: kl, alpah: 3}\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown key loss.alpah" in capsys.readouterr().out


GOLDEN = Path(__file__).with_name("golden_kd_micro.json")


def test_loss_curve_matches_the_golden_curve(corpora, teacher, tmp_path):
    """A fixed tiny KD run reproduces the recorded losses (regenerate the file with
    LOGITCAST_UPDATE_GOLDEN=1 after a change that is meant to move them)."""
    config = _in_process(corpora, tmp_path / "golden", teacher, steps=8, export=False,
                         **{"eval.every": 0})
    with Trainer(config) as t:
        t.run()
    curve = [[r["loss"], r["lm"], r["kd"]] for r in read_log(tmp_path / "golden")
             if r["kind"] == "train"]
    if os.environ.get("LOGITCAST_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(curve, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert len(curve) == len(golden) == 8
    for got, want in zip(curve, golden):
        assert got == pytest.approx(want, rel=1e-4)


def test_document_mode_trains_online_and_from_cache_with_identical_losses(
        corpora, teacher, tmp_path):
    """Rows packed from document pieces: per-document attention in the student, targets per
    document segment on the wire and in the cache."""
    docs = {"data.mode": "documents", "data.max_document_tokens": 16, "steps": 3,
            "eval.every": 3, "export": False}
    with Trainer(_in_process(corpora, tmp_path / "online", teacher, **docs)) as t:
        t.run()
    teacher.call(teacher.server.drain(5.0))
    offline = load_config(None, run_config(corpora, tmp_path / "offline", **docs, **{
        "teacher.source": "cache", "teacher.cache_dir": str(tmp_path / "cache")}))
    with Trainer(offline) as t:
        t.run()
    a, b = read_log(tmp_path / "online"), read_log(tmp_path / "offline")
    assert len(_losses(a)) == 3
    assert _losses(a) == _losses(b)
    assert _evals(a) == _evals(b)


def test_frozen_embeddings_stay_the_initial_ones_while_the_blocks_train(
        corpora, teacher, tmp_path):
    """student.freeze_embeddings: the embedding and LM head are the loaded ones after the
    run, the blocks are not, and AdamW holds no state for the frozen weights."""
    from transformers import AutoModelForCausalLM

    from logitcast.trainer import build_student

    config = _in_process(corpora, tmp_path / "run", teacher, steps=3,
                         **{"student.freeze_embeddings": True})
    with Trainer(config) as t:
        init = build_student(preset="micro", vocab_size=t.vocab)
        final = t.run()
        trained = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
        emb = t.engine.module.student.get_input_embeddings().weight
        assert id(emb) not in trained
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert torch.equal(out.get_input_embeddings().weight, init.get_input_embeddings().weight)
    assert torch.equal(out.get_output_embeddings().weight,
                       init.get_output_embeddings().weight)
    block = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(out.state_dict()[block], init.state_dict()[block])
    # the eval rows' online targets carry the label log-prob: the teacher's own loss
    assert final["teacher_lm_loss"] is not None
    assert 0 < final["teacher_lm_loss"] < final["lm_loss"] + 5
