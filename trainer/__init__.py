"""logitcast.trainer: train a student on teacher targets with DeepSpeed, or in your own loop.

`Trainer(load_config("run.yaml")).run()` is what `logitcast train` does. For a
loop of your own (plain PyTorch, HF Trainer), `student_loss` is the whole
objective for an HF causal LM and `open_source` the per-rank target source;
see docs/trainer.md.
"""

from logitcast.trainer.config import ConfigError, TrainConfig, load_config
from logitcast.trainer.loop import Trainer, read_log
from logitcast.trainer.objective import (
    DistillObjective,
    evaluate_batch,
    student_loss,
    summarize,
)
from logitcast.trainer.sources import find_namespace, open_source
from logitcast.trainer.students import PRESETS, build_student

__all__ = [
    "PRESETS",
    "ConfigError",
    "DistillObjective",
    "TrainConfig",
    "Trainer",
    "build_student",
    "evaluate_batch",
    "find_namespace",
    "load_config",
    "open_source",
    "read_log",
    "student_loss",
    "summarize",
]
