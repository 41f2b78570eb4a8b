"""Signals while a run works. SIGTERM during ``predict`` stops at the next batch boundary (Lightning checks it only
while training and evaluating); the prediction writer keeps the completed batches and the CLI exits 143. During
``fit``, SIGTERM and Ctrl-C are noted by ``DeferredStop`` and acted on by ``atspeed.callbacks.checkpoint.SaveLast``
at the end of the running step."""

from __future__ import annotations

import signal
import threading

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException


class StopPredictOnSigterm(pl.Callback):
    """Raise Lightning's ``SIGTERMException`` after the batch that was running when SIGTERM arrived."""

    def on_predict_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.received_sigterm:
            raise SIGTERMException


class DeferredStop:
    """SIGTERM and SIGINT (Ctrl-C) noted instead of acted on at once, so the run can stop where its state is whole.

    Lightning would stop on SIGTERM after the step's validation and epoch-end hooks (and mid-validation), and Python
    raises ``KeyboardInterrupt`` wherever the interpreter is (inside an optimizer step); the states saved there do
    not all restore exactly. A second Ctrl-C interrupts at once. Handlers are installed only from the main thread and
    not over an ignored SIGINT (a background job); ``restore`` puts the previous ones back.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._note)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _note(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: now, whatever is running
        self.received = self.received or signum

    def exception(self) -> BaseException:
        """What the noted signal ends the run with: ``SIGTERMException`` (the CLI exits 143) or ``KeyboardInterrupt``
        (Lightning exits 1)."""
        return KeyboardInterrupt() if self.received == signal.SIGINT else SIGTERMException()
