"""Two-process CPU DDP (gloo) through the real command line: Lightning relaunches ``python -m atspeed`` per rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.tiny_data import tiny_args, write_processed


@pytest.mark.slow
def test_fit_with_two_cpu_processes(tmp_path) -> None:
    data = write_processed(tmp_path / "data")
    args = tiny_args(data, tmp_path / "run", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "atspeed", "fit", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "hf" / "atspeed.json").read_text())["global_step"] == 8
    assert "val/recall@3" in done.stderr + done.stdout
