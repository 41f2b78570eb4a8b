"""``last.ckpt`` always holds the latest completed step: every N steps (``ModelCheckpoint``), after the final step,
and when fit is interrupted (Ctrl-C, SIGTERM, a crash).

Lightning's own ``OnExceptionCheckpoint`` also makes every later ``fit`` resume silently; this one only refreshes
the checkpoint that ``--ckpt_path last`` picks, so resuming stays an explicit choice. One name, one meaning: the
version counter that would write ``last-v1.ckpt`` is off (``atspeed.cli``), and a fresh fit refuses a directory
that already holds a ``last.ckpt``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


def last_checkpoint_path(trainer: pl.Trainer) -> Path | None:
    """``<checkpoint dir>/last.ckpt`` of the trainer's ``ModelCheckpoint``, or None without one."""
    checkpoint = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)), None)
    if checkpoint is None or checkpoint.dirpath is None:
        return None
    return Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"


class SaveLast(pl.Callback):
    """Write ``last.ckpt`` after the final training step and on any exception during fit."""

    def __init__(self) -> None:
        super().__init__()
        self._saved_step = -1

    def _save(self, trainer: pl.Trainer, why: str) -> None:
        path = last_checkpoint_path(trainer)
        if path is None or trainer.global_step in (0, self._saved_step):
            return
        trainer.save_checkpoint(path)
        self._saved_step = trainer.global_step
        log.info("saved %s at step %d (%s)", path, trainer.global_step, why)

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        # Saved here, like ModelCheckpoint's periodic saves, so the loops' state is that of a completed step;
        # Lightning runs ModelCheckpoint after this callback, so a step it saves anyway is left to it.
        if _final_batch(trainer) and not _periodic_save_step(trainer):
            self._save(trainer, "end of training")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, "end of training")  # stopped by a rule the batch hook cannot foresee (early stopping)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn == "fit":
            self._save(trainer, f"interrupted: {type(exception).__name__}")


def _periodic_save_step(trainer: pl.Trainer) -> bool:
    """Whether a ``ModelCheckpoint`` with ``save_last`` writes ``last.ckpt`` at this step by itself."""
    return any(
        isinstance(cb, ModelCheckpoint) and cb.save_last and trainer.global_step % max(cb._every_n_train_steps, 1) == 0
        for cb in trainer.checkpoint_callbacks
        if getattr(cb, "_every_n_train_steps", 0)
    )


def _final_batch(trainer: pl.Trainer) -> bool:
    """Whether the batch that just ended is the last one this fit trains."""
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return True
    loop = trainer.fit_loop
    last_in_epoch = loop.epoch_loop.batch_progress.is_last_batch
    return bool(last_in_epoch and loop.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= loop.max_epochs)
