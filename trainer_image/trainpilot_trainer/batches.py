"""Training micro-batches on the device, one ahead on a GPU.

With `pinned` (a GPU trial's default): each batch is built in pinned host memory and copied with
`non_blocking`, so the copy runs on the device's queue instead of stalling the host, and the next
batch is built while the device still computes the current one. The batch for a position is the
dataset's (a pure function of seed, rank and position), so prefetching changes nothing of what is
trained, nor of what a checkpoint's data position means.
"""

from __future__ import annotations

import torch

from .data import Dataset

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchFeeder:
    def __init__(self, dataset: Dataset, rank: int, device: torch.device, pinned: bool):
        self.dataset, self.rank, self.device, self.pinned = dataset, rank, device, pinned
        self._ahead: tuple[int, Batch] | None = None

    def take(self, position: int) -> Batch:
        """Micro-batch `position` of this rank, on the device."""
        if self._ahead is not None and self._ahead[0] == position:
            batch = self._ahead[1]
            self._ahead = None
            return batch
        return self._load(position)

    def prefetch(self, position: int) -> None:
        """Start micro-batch `position` on its way (pinned only: on a CPU there is nothing to overlap)."""
        if self.pinned and (self._ahead is None or self._ahead[0] != position):
            self._ahead = (position, self._load(position))

    def _load(self, position: int) -> Batch:
        x, y = self.dataset.train_batch(self.rank, position)
        host = (torch.from_numpy(x), torch.from_numpy(y))
        if self.pinned:
            host = (host[0].pin_memory(), host[1].pin_memory())
        return host[0].to(self.device, non_blocking=self.pinned), host[1].to(self.device, non_blocking=self.pinned)
