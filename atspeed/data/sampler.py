"""The training loader: a seeded shuffle per epoch whose position Lightning checkpoints, so resume is exact."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader


class ResumableLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader`` over a ``DistributedSampler`` (order = f(seed, epoch), this rank's share).

    Lightning saves ``state_dict()`` of every stateful loader in each checkpoint and loads it before the resumed
    epoch, so training continues with the very batch it would have seen next. Two gaps are closed here:

    - Lightning creates the resumed epoch's iterator before it calls ``set_epoch``, so the sampler's epoch travels in
      the state and is restored first (otherwise a run resumed in epoch e > 0 replays epoch 0's order).
    - A state saved after an epoch's last batch is that epoch's end, and what Lightning asks of it on resume depends
      on where the checkpoint was written: from the end of the batch (periodic saves, a crash) it counts the epoch as
      done and pulls epoch e + 1 from the restored iterator; after the batch's validation and logging (a signal,
      Lightning's own stop) it first asks epoch e for more. Both set the sampler's epoch between creating the
      iterator and pulling from it, so the restored end serves nothing more of epoch e and epoch e + 1 whole.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._restored_end: int | None = None  # the epoch whose end was restored, until the next epoch starts

    def state_dict(self) -> dict[str, Any]:
        if self._restored_end is not None:
            return {"epoch": self._restored_end, "loader": {}, "ended": True}
        state, epoch = super().state_dict(), self.sampler.epoch
        if _batches_served(state) >= len(self):
            return {"epoch": epoch, "loader": {}, "ended": True}
        return {"epoch": epoch, "loader": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sampler.set_epoch(state_dict["epoch"])
        self._restored_end = state_dict["epoch"] if state_dict.get("ended") else None
        super().load_state_dict(state_dict["loader"])  # an empty loader state = start the epoch afresh

    def __iter__(self):
        if self._restored_end is None:
            return super().__iter__()
        return self._after_restored_end(self._restored_end)

    def _after_restored_end(self, ended: int):
        """Nothing while the sampler is still at the ended epoch; the next epoch whole once it moved on."""
        if self.sampler.epoch == ended:
            return
        self._restored_end = None
        yield from super().__iter__()


def _batches_served(state: dict[str, Any]) -> int:
    """Batches the loader's iterator has yielded this epoch (single-process and worker-process state layouts)."""
    if "_snapshot" in state:
        return int(state["_snapshot"]["_snapshot_step"])
    return int(state.get("_num_yielded", 0))


def resumable_loader(
    items: Sequence,
    batch_size: int,
    collate_fn: Callable,
    seed: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> ResumableLoader:
    """Batches of this rank's share of ``items``, shuffled by (seed, epoch): the same order whether resumed or not.

    A ``DistributedSampler`` even with one process, so Lightning keeps it under DDP instead of wrapping it.
    """
    sampler = DistributedSampler(items, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, which torch >= 2.10 deprecates
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return ResumableLoader(
            items, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, num_workers=num_workers
        )
