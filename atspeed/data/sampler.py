"""A seeded shuffling sampler that can start mid-epoch, so a resumed fit sees exactly the batches it had left."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Shuffles ``size`` indices with a generator seeded by (seed, epoch); ``resume_at`` skips served samples.

    Lightning calls ``set_epoch`` before each epoch. The skip applies to the next iteration only.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, samples_served: int) -> None:
        self._skip = max(0, samples_served)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)[self._skip :]
        self._skip = 0
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.size - self._skip
