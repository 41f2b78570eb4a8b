"""The tiny SFT run on a CUDA device (skipped without one; CI has none)."""

from __future__ import annotations

import pytest

from atspeed.cli import main
from tests.integration.tiny_data import tiny_args, write_processed


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_tiny_fit_on_gpu(tmp_path, precision: str) -> None:
    data = write_processed(tmp_path / "data")
    args = tiny_args(data, tmp_path / "run", "--trainer.accelerator", "gpu", "--trainer.precision", precision)
    cli = main(["fit", *args])
    assert cli.trainer.global_step == 8
    assert next(cli.model.model.parameters()).is_cuda
    assert 0.0 <= float(cli.trainer.callback_metrics["val/recall@3"]) <= 1.0
