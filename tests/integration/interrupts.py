"""Callbacks that interrupt a run at a chosen point, the way the real world does: a crash, or a signal the process
sends itself (so the real signal handlers run, in a subprocess where it is SIGKILL)."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl


class CrashAt(pl.Callback):
    """Raise (a crash: OOM, a bug) when ``hook`` runs at optimizer step ``step``."""

    def __init__(self, step: int, hook: str = "on_train_batch_end") -> None:
        self.step = step
        setattr(self, hook, self._maybe_crash)

    def _maybe_crash(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step and not trainer.sanity_checking:
            raise RuntimeError("simulated crash")


class SignalAt(pl.Callback):
    """Send ``signal_name`` to this process once, when ``hook`` runs at optimizer step ``step`` (by default after
    training step ``step``; ``on_before_optimizer_step`` at ``step`` is inside step ``step + 1``), or after predict
    batch ``predict_batch``."""

    def __init__(
        self, signal_name: str, step: int = -1, predict_batch: int = -1, hook: str = "on_train_batch_end"
    ) -> None:
        self.signum = getattr(signal, signal_name)
        self.step = step
        self.predict_batch = predict_batch
        self.sent = False
        setattr(self, hook, self._maybe_signal)

    def _maybe_signal(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step and not trainer.sanity_checking and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.predict_batch:
            os.kill(os.getpid(), self.signum)


class RecordBatches(pl.Callback):
    """(optimizer step, epoch, fingerprint of the batch's token ids) for every training batch."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, str]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx) -> None:
        digest = hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()[:12]
        self.rows.append((trainer.global_step, trainer.current_epoch, digest))


class WaitForFile(pl.Callback):
    """Hold the run where training or predicting starts until ``path`` exists (a test's cue to go on); while it
    waits, ``<path>.waiting`` exists."""

    def __init__(self, path: str, timeout: float = 300.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def _wait(self, *args) -> None:
        self.path.with_name(self.path.name + ".waiting").touch()
        deadline = time.monotonic() + self.timeout
        while not self.path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.path} never appeared")
            time.sleep(0.05)

    on_train_start = on_predict_start = _wait
