"""The HF Trainer trains a student on streamed teacher targets through `DistillationTrainer`."""

import pytest
import torch

from logitcast.client.dataset import DistillDataset
from logitcast.client.teacher_client import TeacherClient
from logitcast.data.packing import Packer, PackingConfig
from logitcast.ops import KDConfig, TargetSpec
from logitcast.trainer.hf import DistillationTrainer, distill_collate
from logitcast.trainer.students import build_student

pytestmark = pytest.mark.slow


def test_hf_trainer_learns_from_streamed_targets(corpora, teacher, tiny_backend, tmp_path):
    from transformers import TrainingArguments

    train, _ = corpora
    packer = Packer(train, PackingConfig(seq_len=32, global_batch=4))
    student = build_student(preset="micro", vocab_size=train.vocab_size)
    before = student.model.layers[0].mlp.up_proj.weight.detach().clone()
    client = TeacherClient([teacher.address], TargetSpec(method="sample", unique=12.0),
                           tokenizer_fingerprint=tiny_backend.tokenizer_fingerprint,
                           vocab_size=train.vocab_size)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=5,
                             per_device_train_batch_size=1, learning_rate=3e-3,
                             logging_steps=1, report_to=[], save_strategy="no",
                             remove_unused_columns=False, use_cpu=True,
                             dataloader_num_workers=0)
    with client:
        trainer = DistillationTrainer(model=student, args=args,
                                      train_dataset=DistillDataset(packer, client, steps=5),
                                      alpha=0.7, kd_config=KDConfig(loss="kl"))
        result = trainer.train()
    assert result.global_step == 5
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 5
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, student.model.layers[0].mlp.up_proj.weight)
    assert client.metrics.steps._value.get() >= 5  # every step's targets came from the fleet


def test_collate_refuses_batches_of_several_steps():
    with pytest.raises(ValueError, match="per_device_train_batch_size=1"):
        distill_collate([{"input_ids": 1}, {"input_ids": 2}])
