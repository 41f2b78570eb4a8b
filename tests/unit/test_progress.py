"""``ProgressLog``: log lines while a loop runs, only where no progress bar can show (output not a terminal)."""

from __future__ import annotations

import io
import logging
import time
import typing
from types import SimpleNamespace

import pytest
import torch

from atspeed.callbacks.progress import ProgressLog


def fit_lines(callback: ProgressLog, steps: int, monkeypatch, tty: bool) -> list[str]:
    """The lines ``callback`` logs over ``steps`` training batches (each 20 ms apart) of a 100-step fit."""
    monkeypatch.setattr("sys.stderr", SimpleNamespace(isatty=lambda: tty, write=lambda _: None, flush=lambda: None))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("atspeed.progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    trainer = SimpleNamespace(global_step=0, max_steps=100, callback_metrics={"train/loss": torch.tensor(0.5)})
    try:
        callback.on_train_start(trainer, None)
        for step in range(1, steps + 1):
            time.sleep(0.02)
            trainer.global_step = step
            callback.on_train_batch_end(trainer, None, None, None, step - 1)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue().splitlines()


def test_lines_appear_when_not_a_terminal_and_are_spaced(monkeypatch) -> None:
    lines = fit_lines(ProgressLog(every_seconds=0.05), 10, monkeypatch, tty=False)
    assert 2 <= len(lines) <= 5, lines  # about one per 50 ms over 200 ms, never one per batch
    assert lines[-1].startswith("fit: step ") and " of 100, " in lines[-1] and "train/loss 0.5000" in lines[-1]


@pytest.mark.parametrize(("when", "tty", "expect"), [("auto", True, False), ("never", False, False),
                                                     ("always", True, True)])  # fmt: skip
def test_when(monkeypatch, when: str, tty: bool, expect: bool) -> None:
    lines = fit_lines(ProgressLog(every_seconds=0.01, when=when), 5, monkeypatch, tty=tty)
    assert bool(lines) == expect


def test_every_seconds_must_be_positive() -> None:
    """The type refuses it, so the CLI stops while parsing (``progress.every_seconds``)."""
    hint = typing.get_type_hints(ProgressLog.__init__)["every_seconds"]
    with pytest.raises(ValueError):
        hint(0)
    assert hint(0.5) == 0.5
