"""A torch `IterableDataset` of (rows, teacher targets) steps for one rank.

Wraps a `Packer` and a `TeacherClient`: iterating yields one dict per step
with `input_ids`, `labels`, `document_ids` (or None) and `targets`
(`SparseTargets` over B*T positions), prefetched ahead. Use it with
`DataLoader(dataset, batch_size=None, num_workers=0)`: the client already
works in the background.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from logitcast.client.teacher_client import TeacherClient
from logitcast.data.packing import Packer


class DistillDataset(torch.utils.data.IterableDataset):
    """Steps [start_step, start_step + steps) for `rank` of `world`."""

    def __init__(self, packer: Packer, client: TeacherClient, *, rank: int = 0, world: int = 1,
                 start_step: int = 0, steps: int | None = None) -> None:
        super().__init__()
        self.packer, self.client = packer, client
        self.rank, self.world, self.start_step, self.steps = rank, world, start_step, steps

    def _batches(self):
        step = self.start_step
        while self.steps is None or step < self.start_step + self.steps:
            yield self.packer.batch(step, self.rank, self.world)
            step += 1

    def __iter__(self) -> Iterator[dict]:
        for item in self.client.stream(self._batches()):
            b = item.batch
            yield {"step": b.step, "input_ids": b.input_ids, "labels": b.labels,
                   "document_ids": b.document_ids, "targets": item.targets,
                   "cache_hits": item.cache_hits}
