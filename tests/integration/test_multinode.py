"""Launchers: two CPU processes started by scripts/torchrun.sh (torchrun, gloo) train as one process would, and
num_nodes / devices that disagree with the launcher stop the run before anything is built."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from atspeed.cli import main
from tests.integration.tiny_data import ROOT, align_args, run_cli, tiny_args, write_processed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    (path,) = (run / "hf").glob("*.safetensors")
    return load_file(path)


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``scripts/torchrun.sh fit <args>`` with 2 CPU processes on this machine."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT),
           "PYTHON": sys.executable, "NPROC_PER_NODE": "2", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    return subprocess.run(["bash", str(ROOT / "scripts/torchrun.sh"), "fit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def _same_weights(one: Path, two: Path) -> None:
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["last.ckpt"]  # one checkpoint, from rank 0
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=2e-4, rtol=1e-3, msg=name)


@pytest.mark.slow
def test_two_torchrun_processes_train_like_one_with_the_same_global_batch(tmp_path) -> None:
    """1 process with batch 32 against 2 torchrun processes with 16 each: DistributedSampler gives the two ranks the
    halves of the same global batch and DDP averages their gradients, so 8 steps end at the same weights (float
    rounding apart; with 32 per process the test fails on lm_head); one checkpoint and one export are written."""
    data = write_processed(tmp_path / "data")
    one = run_cli("fit", tiny_args(data, tmp_path / "one", "--data.batch_size", "32"), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(tiny_args(data, tmp_path / "two", "--data.batch_size", "16", "--trainer.strategy", "ddp"), tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    _same_weights(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_draft_alignment_on_two_torchrun_processes_trains_like_one(exported, teacher_data, tmp_path) -> None:
    """The same for draft alignment (cached teacher data, the frozen target outside the module on every rank)."""
    one = run_cli("fit", align_args(exported, teacher_data, tmp_path / "one", "--data.batch_size", "32"), tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    args = align_args(exported, teacher_data, tmp_path / "two", "--data.batch_size", "16", "--trainer.strategy", "ddp")
    two = _torchrun(args, tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    _same_weights(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize(
    ("env", "flags", "message"),
    [
        ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, ["--trainer.devices", "2"],
         "trainer.num_nodes = 1, but torchrun runs 2 nodes"),
        ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, ["--trainer.devices", "1"],
         "trainer.devices = 1, but torchrun started 2 processes per node"),
        ({"SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NAME": "atspeed"},
         ["--trainer.devices", "4"], "trainer.num_nodes = 1, but Slurm runs 2 nodes"),
    ],
)  # fmt: skip
def test_num_nodes_or_devices_unlike_the_launchers_stop_the_run(env, flags, message, tmp_path, monkeypatch, capsys):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    data = write_processed(tmp_path / "data")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_args(data, tmp_path / "run", *flags)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Seed set" not in err, err
