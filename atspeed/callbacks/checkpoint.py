"""``last.ckpt`` always holds the latest completed step: every N steps (``ModelCheckpoint``), after the final step,
and when fit is stopped (SIGTERM, Ctrl-C) or crashes between steps.

Every checkpoint is written where Lightning's own periodic ones are, at the end of a training step (or after a
validation), because only those states restore exactly: resumed, the run sees the same batches, draws the same
on-policy samples and ends with the same weights. A signal is therefore noted (``DeferredStop``) and acted on at the
end of the running step: ``last.ckpt`` is written there, the step's logging and validation finish, and the run stops
before the next step (exit 143 for SIGTERM, 1 for Ctrl-C; after the final step, once the export is written). A crash
inside a step (an out-of-memory error in the backward pass) saves nothing: its loader has moved on and its optimizer
may be half-way, so ``last.ckpt`` stays at the step saved before.

Lightning's own ``OnExceptionCheckpoint`` also makes every later ``fit`` resume silently; this one only refreshes
the checkpoint that ``--ckpt_path last`` picks, so resuming stays an explicit choice. One name, one meaning: the
version counter that would write ``last-v1.ckpt`` is off (``atspeed.cli``), and a fresh fit refuses a directory
that already holds a ``last.ckpt``.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from atspeed.callbacks.signals import DeferredStop

log = logging.getLogger(__name__)


def last_checkpoint_path(trainer: pl.Trainer) -> Path | None:
    """``<checkpoint dir>/last.ckpt`` of the trainer's ``ModelCheckpoint``, or None without one."""
    checkpoint = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)), None)
    if checkpoint is None or checkpoint.dirpath is None:
        return None
    return Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"


class SaveLast(pl.Callback):
    """Write ``last.ckpt`` after the final training step, at the end of the step a signal arrived in (then stop before
    the next one), and on a crash between steps."""

    def __init__(self) -> None:
        super().__init__()
        self._saved_step = -1
        self._stop = DeferredStop()
        self._stopping = False  # a signal arrived and its step is saved: stop at the next step's start

    def _save(self, trainer: pl.Trainer, why: str) -> None:
        path = last_checkpoint_path(trainer)
        if path is None or trainer.global_step in (0, self._saved_step):
            return
        trainer.save_checkpoint(path)
        self._saved_step = trainer.global_step
        log.info("saved %s at step %d (%s)", path, trainer.global_step, why)

    def _signalled(self, trainer: pl.Trainer) -> bool:
        """Whether any process got SIGTERM or Ctrl-C (every rank calls this at the same point: one all-reduce)."""
        return trainer.strategy.reduce_boolean_decision(self._stop.received is not None, all=False)

    def _save_for_stop(self, trainer: pl.Trainer) -> None:
        if not self._stopping and self._signalled(trainer):
            name = signal.Signals(self._stop.received).name if self._stop.received else "a signal on another rank"
            self._save(trainer, f"stopping: {name}")
            self._stopping = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop, self._stopping = DeferredStop(), False
        self._stop.install()
        if trainer.received_sigterm:  # arrived before training started (while Lightning's handler was in place)
            self._stop.received = signal.SIGTERM

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        # Saved here, like ModelCheckpoint's periodic saves, so the loops' state is that of a completed step;
        # Lightning runs ModelCheckpoint after this callback, so a step it saves anyway is left to it.
        self._save_for_stop(trainer)
        if _final_batch(trainer) and not _periodic_save_step(trainer):
            self._save(trainer, "end of training")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save_for_stop(trainer)  # arrived during the validation: the step and its validation are done

    def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
        if self._stopping:  # the step before is saved, logged and validated
            raise self._stop.exception()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_train_batch_start(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, "end of training")  # stopped by a rule the batch hook cannot foresee (early stopping)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After fit and its export: a signal that arrived during the final step still ends the process with its
        exit status."""
        self._stop.restore()
        if stage == "fit" and self._stop.received is not None and not trainer.interrupted:
            raise self._stop.exception()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop.restore()
        if trainer.state.fn != "fit" or self._stopping:
            return
        if _inside_step(trainer):
            log.info("not saved: interrupted inside step %d (%s)", trainer.global_step + 1, type(exception).__name__)
            return
        self._save(trainer, f"interrupted: {type(exception).__name__}")


def _inside_step(trainer: pl.Trainer) -> bool:
    """Whether a training batch was fetched and its step not finished: the loader has served it, the optimizer may
    have updated part of the weights; no checkpoint of that state resumes exactly."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.total
    return not progress.ready == progress.started == progress.processed


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
