"""`DistillationTrainer`: the Hugging Face `Trainer`, training on teacher targets.

Feed it a `logitcast.client.dataset.DistillDataset` (one item per optimizer
step: a rank's packed rows with their `SparseTargets`, prefetched by the
client); it computes `student_loss` (fused LM + KD loss) instead of the model's
own loss. Everything else — optimizer, schedules, logging, checkpoints,
accelerate/DeepSpeed integration — is the HF Trainer's. Set `max_steps`,
`per_device_train_batch_size=1` (an item already is a whole batch) and
`remove_unused_columns=False`; `distill_collate` is the collator.

The KD weight alpha is constant here (`alpha=`), or any callable of the step.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import Trainer

from logitcast.ops import KDConfig
from logitcast.trainer.objective import student_loss


def distill_collate(items: list[dict]) -> dict:
    """The one step-item of a batch of size 1, unchanged (its tensors are already batched)."""
    if len(items) != 1:
        raise ValueError(f"use per_device_train_batch_size=1 with a DistillDataset "
                         f"(each item is a whole step); got {len(items)} items")
    item = dict(items[0])
    item.pop("step", None)
    item.pop("cache_hits", None)
    return item


class DistillationTrainer(Trainer):
    """`transformers.Trainer` whose loss is `(1 - alpha) * CE + alpha * KD(targets)`."""

    def __init__(self, *args, alpha: float | Callable[[int], float] = 0.5,
                 kd_config: KDConfig | None = None, fused: bool = True, **kwargs) -> None:
        kwargs.setdefault("data_collator", distill_collate)
        super().__init__(*args, **kwargs)
        self.alpha, self.kd_config, self.fused = alpha, kd_config or KDConfig(), fused

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step = self.state.global_step
        alpha = self.alpha(step) if callable(self.alpha) else self.alpha
        targets = inputs["targets"]
        device = inputs["input_ids"].device
        if targets is not None and targets.device != device:
            targets = targets.to(device)
        loss, parts = student_loss(model, inputs["input_ids"], inputs["labels"], targets,
                                   alpha=alpha, config=self.kd_config,
                                   document_ids=inputs.get("document_ids"), fused=self.fused)
        return (loss, parts) if return_outputs else loss
