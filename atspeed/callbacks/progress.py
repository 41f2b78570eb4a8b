"""Progress as log lines, for runs whose output is a log file: Lightning's bars print nothing there."""

from __future__ import annotations

import logging
import sys
import time
from typing import Literal

import lightning.pytorch as pl
from jsonargparse.typing import PositiveFloat
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger("atspeed.progress")


class ProgressLog(pl.Callback):
    """A line every ``every_seconds`` while training, validating, testing or predicting (rank 0)."""

    def __init__(self, every_seconds: PositiveFloat = 10.0, when: Literal["auto", "always", "never"] = "auto") -> None:
        """
        Args:
            every_seconds: at most one line per this many seconds per loop.
            when: ``auto``: only when stderr is not a terminal (a terminal has the bar); ``always``; ``never``.
        """
        super().__init__()
        self.every_seconds = every_seconds
        self.when = when
        self._clocks: dict[str, tuple[float, float]] = {}  # loop -> (started, last line)
        self._first_step = 0

    @property
    def active(self) -> bool:
        return self.when == "always" or (self.when == "auto" and not sys.stderr.isatty())

    def _restart(self, loop: str) -> None:
        now = time.monotonic()
        self._clocks[loop] = (now, now)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restart("fit")
        self._first_step = trainer.global_step  # a resumed fit counts its own steps for the rate

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restart("validation")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restart("test")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restart("predict")

    def _due(self, loop: str) -> float | None:
        """Seconds since ``loop`` started when a line is due, else None."""
        now = time.monotonic()
        start, last = self._clocks.get(loop, (now, now))
        if not self.active or now - last < self.every_seconds:
            return None
        self._clocks[loop] = (start, now)
        return now - start

    @rank_zero_only
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        elapsed = self._due("fit")
        if elapsed is None:
            return
        step, total = trainer.global_step, trainer.max_steps
        done = step - self._first_step
        loss = trainer.callback_metrics.get("train/loss")
        parts = [f"fit: step {step}" + (f" of {total}" if total and total > 0 else ""), f"{done / elapsed:.1f} steps/s"]
        if total and total > 0 and done:
            parts.append(f"about {(total - step) * elapsed / done:.0f} s left")
        if loss is not None:
            parts.append(f"train/loss {float(loss):.4f}")
        log.info("%s (%.0f s)", ", ".join(parts), elapsed)

    def _eval_line(self, what: str, trainer: pl.Trainer, batch_idx: int, dataloader_idx: int, totals) -> None:
        elapsed = self._due(what)
        if elapsed is None:
            return
        total = totals[dataloader_idx] if dataloader_idx < len(totals) else None
        of = f" of {int(total)}" if total is not None and total != float("inf") else ""
        log.info("%s: batch %d%s of loader %d (%.0f s)", what, batch_idx + 1, of, dataloader_idx, elapsed)

    @rank_zero_only
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_line("validation", trainer, batch_idx, dataloader_idx, trainer.num_val_batches)

    @rank_zero_only
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_line("test", trainer, batch_idx, dataloader_idx, trainer.num_test_batches)

    @rank_zero_only
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_line("predict", trainer, batch_idx, dataloader_idx, trainer.num_predict_batches)
