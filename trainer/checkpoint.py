"""Checkpoints: DeepSpeed's own format, read back without unpickling arbitrary objects.

`save` writes a DeepSpeed checkpoint tagged `step00000012` (model, optimizer
and ZeRO partitions of every rank, our step in the client state); DeepSpeed
updates the `latest` file only after every rank's files are written, so a
crash mid-save leaves the previous checkpoint as the newest. Older tags beyond
`keep` are removed by rank 0 after all ranks have finished writing.

Loading goes through `SafeCheckpointEngine`: `torch.load(weights_only=True)`
with an allowlist of the few plain DeepSpeed state classes a checkpoint
contains, instead of DeepSpeed's default full unpickling. Rows are a pure
function of the step, so restoring the step is all a resumed run needs to see
the same rows and targets.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TAG = re.compile(r"^step(\d{8})$")


def _safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def install_safe_loading(engine) -> None:
    """Make `engine.load_checkpoint` read with torch.load(weights_only=True)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    safe = SafeCheckpointEngine(engine._config)
    engine.checkpoint_engine = safe
    if getattr(engine, "optimizer", None) is not None and \
            hasattr(engine.optimizer, "checkpoint_engine"):
        engine.optimizer.checkpoint_engine = safe


def tag(step: int) -> str:
    return f"step{step:08d}"


def latest_step(directory: str | Path) -> int | None:
    """The step of the newest complete checkpoint in `directory`, or None."""
    latest = Path(directory) / "latest"
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    m = TAG.match(name)
    if not m or not (Path(directory) / name).is_dir():
        raise ValueError(f"{latest} names {name!r}, which is not a checkpoint in {directory}")
    return int(m.group(1))


def save(engine, directory: str | Path, step: int, *, keep: int, client_state: dict) -> None:
    """Checkpoint after `step` optimizer steps; prune to the newest `keep` (collective)."""
    engine.save_checkpoint(str(directory), tag=tag(step),
                           client_state={**client_state, "step": step})
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if engine.global_rank == 0:
        tags = sorted(p.name for p in Path(directory).iterdir() if TAG.match(p.name))
        for old in tags[:-keep]:
            shutil.rmtree(Path(directory) / old, ignore_errors=True)


def load(engine, directory: str | Path) -> dict:
    """Load the newest checkpoint into `engine`; returns its client state (with "step")."""
    step = latest_step(directory)
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    path, client_state = engine.load_checkpoint(str(directory), tag=tag(step))
    if path is None:
        raise ValueError(f"checkpoint {tag(step)} in {directory} could not be loaded")
    return client_state
