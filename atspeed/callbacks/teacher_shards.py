"""Write the ``Teacher`` module's outputs as shards (``atspeed.data.teacher_store``) while predicting.

Each process writes its own shards of about ``shard_samples`` samples, atomically; a run that is interrupted keeps
its complete shards, and the same command resumes after them. When every process is done, rank 0 writes the
manifest. Teacher data of another target, item index or settings in ``dirpath`` stops the run before any decoding.
"""

from __future__ import annotations

import logging
import time

import lightning.pytorch as pl
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors import safe_open

from atspeed.data.teacher_store import (
    SAMPLE_ID,
    existing_shards,
    fingerprint,
    stack_padded,
    write_manifest,
    write_shard,
)

log = logging.getLogger(__name__)


class TeacherShardWriter(BasePredictionWriter):
    """Shards of teacher data in ``dirpath`` (``shard-r<rank>-<n>.safetensors`` + ``manifest.json``)."""

    def __init__(self, dirpath: str, shard_samples: PositiveInt = 4096) -> None:
        """
        Args:
            dirpath: directory of the teacher data (created; reused by a resumed run of the same target and settings).
            shard_samples: samples per shard (a shard is written once it holds at least this many).
        """
        super().__init__(write_interval="batch")
        self.dirpath = dirpath
        self.shard_samples = shard_samples
        self._pending: list[dict[str, torch.Tensor]] = []
        self._next = 0
        self._fp: dict = {}
        self._written = 0
        self._clock = 0.0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before decoding: refuse foreign teacher data; let the module skip the samples of complete shards."""
        if stage != "predict":
            return
        trainer.predict_loop.return_predictions = False  # the shards hold them: no copy of all of them in memory
        self._fp = fingerprint(pl_module.hparams.target, pl_module.settings())
        done = existing_shards(self.dirpath, self._fp)
        mine = [s for s in done if s.rank == trainer.global_rank]
        self._next = 1 + max((int(s.path.stem.rsplit("-", 1)[1]) for s in mine), default=-1)
        for shard in done:
            with safe_open(str(shard.path), framework="pt") as handle:
                pl_module.skip.update(handle.get_tensor(SAMPLE_ID).tolist())
        if done:
            log.info("teacher data: %d samples in %d complete shards are kept", len(pl_module.skip), len(done))

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clock = time.monotonic()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if not prediction:  # a batch of an earlier run's complete shard
            return
        self._pending.append(prediction)
        if sum(p[SAMPLE_ID].shape[0] for p in self._pending) >= self.shard_samples:
            self._flush(trainer)

    def _flush(self, trainer: pl.Trainer) -> None:
        if not self._pending:
            return
        tensors = {key: stack_padded([p[key] for p in self._pending]) for key in self._pending[0]}
        path = write_shard(self.dirpath, trainer.global_rank, self._next, tensors, self._fp["hash"])
        self._written += tensors[SAMPLE_ID].shape[0]
        self._pending, self._next = [], self._next + 1
        rate = self._written / max(time.monotonic() - self._clock, 1e-9)
        log.info("teacher data: wrote %s (%d samples this run, %.1f samples/s)", path.name, self._written, rate)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)
        trainer.strategy.barrier("teacher_shards")
        if trainer.is_global_zero:
            write_manifest(self.dirpath, self._fp, existing_shards(self.dirpath, self._fp))
            log.info("teacher data complete in %s", self.dirpath)
