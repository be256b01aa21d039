import json

import pytest

from logitcast.trainer.config import ConfigError, DataConfig, TrainConfig, load_config

BASE = ["data.train_tokens=/tmp/tokens"]


def test_defaults_load_and_round_trip_through_json(tmp_path):
    config = load_config(None, BASE)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config.to_dict()))
    assert load_config(path) == config


def test_yaml_file_with_nested_sections_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 40\ndata:\n  train_tokens: /x\n  seq_len: 128\n"
                    "teacher:\n  source: online\n  addresses: ['127.0.0.1:5']\n"
                    "loss:\n  alpha: {name: wsd, peak: 0.9, warmup_frac: 0.1, decay_frac: 0.1}\n"
                    "deepspeed: {zero_optimization: {stage: 2}}\n")
    config = load_config(path, ["optim.lr.peak=3e-4", "teacher.spec={method: topk, k: 12}"])
    assert config.steps == 40
    assert config.data.seq_len == 128
    assert config.optim.lr["peak"] == 3e-4
    assert config.teacher.target_spec().method == "topk"
    assert config.deepspeed_config()["zero_optimization"]["stage"] == 2


def test_unknown_key_names_its_dotted_path_and_the_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key data\.seq_lenn; data takes .*seq_len"):
        load_config(None, [*BASE, "data.seq_lenn=5"])
    with pytest.raises(ConfigError, match="unknown key stepz"):
        load_config(None, [*BASE, "stepz=5"])


@pytest.mark.parametrize(("override", "message"), [
    ("steps=0", "steps must be > 0"),
    ("steps=ten", "steps must be int"),
    ("data.mode=bytes", "data.mode must be rows or documents"),
    ("teacher.source=online", "teacher.addresses is empty"),
    ("teacher.source=cache", "teacher.cache_dir is required"),
    ("teacher.spec={method: magic}", "teacher.spec"),
    ("teacher.cache_on_corrupt=ignore", "teacher.cache_on_corrupt must be error or skip"),
    ("loss.kd=jsd", "loss.kd must be one of"),
    ("loss.alpha={name: wsd, peak: 1.5, warmup_steps: 1, decay_steps: 1}", "loss.alpha: peak"),
    ("optim.lr={name: cosine, peak: 1e-3, warmup_steps: 500}", "optim.lr: warmup_steps=500"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers"),
    ("eval.spec={method: topk, k: 5}", "eval.spec must cover the whole teacher distribution"),
    ("precision=fp8", "precision must be auto, bf16 or fp32"),
    ("deepspeed={optimizer: {type: Adam}}", "deepspeed.optimizer is not supported"),
    ("deepspeed={zero_optimization: {stage: 4}}", "stage must be 0-3"),
    ("student.preset=huge", "student.preset must be one of"),
    ("stop_at=500", "stop_at must be in"),
    ("progress=maybe", "progress must be bool"),
])
def test_bad_values_are_clear_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [*BASE, override])


def test_skipping_damaged_records_is_refused_for_losses_that_need_head_entries():
    load_config(None, [*BASE, "teacher.cache_on_corrupt=skip", "loss.kd=kl"])
    with pytest.raises(ConfigError, match="loss.kd=ghost needs at every position"):
        load_config(None, [*BASE, "teacher.cache_on_corrupt=skip", "loss.kd=ghost"])


def test_unreadable_and_malformed_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid yaml"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="config must be a mapping"):
        load_config(listed)


def test_deepspeed_config_may_be_a_json_file(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    config = load_config(None, [*BASE, f"deepspeed={ds}"])
    assert config.deepspeed_config()["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match="deepspeed config"):
        load_config(None, [*BASE, f"deepspeed={tmp_path / 'nope.json'}"])


def test_ce_only_runs_evaluate_without_teacher_targets():
    config = TrainConfig(data=DataConfig(train_tokens="/x"))
    assert config.teacher.source == "none"
    assert config.eval.source == "none"


def test_missing_data_section_is_named():
    with pytest.raises(ConfigError, match="data"):
        load_config(None, ["steps=5"])


def test_yaml_numbers_keep_their_types(tmp_path):
    config = load_config(None, [*BASE, "optim.eps=1e-6", "steps=12"])
    assert config.optim.eps == 1e-6
    assert isinstance(config.steps, int)
