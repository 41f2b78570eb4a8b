"""Two-process CPU DDP (gloo) through the real command line: Lightning relaunches ``python -m atspeed`` per rank."""

from __future__ import annotations

import json

import pytest

from tests.integration.tiny_data import run_cli, tiny_args, write_processed


@pytest.mark.slow
def test_fit_with_two_cpu_processes(tmp_path) -> None:
    data = write_processed(tmp_path / "data")
    args = tiny_args(data, tmp_path / "run", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    done = run_cli("fit", args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "hf" / "atspeed.json").read_text())["global_step"] == 8
    assert "val/recall@3" in done.stderr + done.stdout
