"""Resume is exact: interrupted at any point (mid-epoch, an epoch's last batch, in a later epoch, during or after
validation; a crash, SIGTERM, SIGKILL), ``fit --ckpt_path last`` trains on the same batches in the same order,
logs the same losses and ends with the same weights as a run that was never interrupted."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from atspeed.cli import SIGTERM_EXIT, main
from tests.integration.interrupts import CrashAt, RecordBatches
from tests.integration.tiny_data import run_cli, tiny_args, write_processed

# 6 batches per epoch on the tiny data: 14 steps cross two epoch ends; validation at steps 5 and 10 (mid-epoch);
# periodic checkpoints every 4 steps
STEPS = 14
SCHEDULE = [
    "--trainer.max_steps", str(STEPS),
    "--trainer.val_check_interval", "5",
    "--trainer.log_every_n_steps", "1",
    "--checkpoint.every_n_train_steps", "4",
]  # fmt: skip


def _args(data: Path, run: Path, *extra: str) -> list[str]:
    return tiny_args(data, run, *SCHEDULE, *extra)


def _fit(data: Path, run: Path, *callbacks, ckpt_path: str | None = None):
    cli = main(_args(data, run), run=False)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli


def _logged(run: Path, version: int) -> dict[tuple[str, int], float]:
    """(metric, step) -> value from the CSV log of one run (version) of ``run``."""
    with open(run / "logs" / f"version_{version}" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {(k, int(r["step"])): float(v) for r in rows for k, v in r.items() if v and k not in ("step", "epoch")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: (data dir, batches seen, final weights, logged values)."""
    root = tmp_path_factory.mktemp("straight")
    data = write_processed(root / "data")
    record = RecordBatches()
    cli = _fit(data, root / "run", record)
    assert record.rows[-1][0] == STEPS - 1 and {epoch for _, epoch, _ in record.rows} == {0, 1, 2}
    return data, record.rows, cli.model.model.state_dict(), _logged(root / "run", 0)


def _assert_continues(straight, run: Path, resumed_cli, record: RecordBatches, version: int = 1) -> None:
    _, rows, weights, logged = straight
    first = record.rows[0][0]
    assert first > 0, "resumed from a checkpoint, not from scratch"
    assert record.rows == rows[first:], "the resumed run sees exactly the batches the uninterrupted run saw"
    state = resumed_cli.model.model.state_dict()
    for name, tensor in weights.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
    resumed_log = _logged(run, version)
    train = {key: value for key, value in logged.items() if key[0] == "train/loss" and key[1] >= first}
    assert train and {key: resumed_log.get(key) for key in train} == train, "same training losses"
    later_val = {key: value for key, value in logged.items() if key[0].startswith("val/") and key[1] > first}
    assert {key: resumed_log.get(key) for key in later_val} == later_val, "same validation results"
    assert json.loads((run / "hf" / "atspeed.json").read_text())["global_step"] == STEPS


@pytest.mark.parametrize(
    ("step", "hook"),
    [
        (3, "on_train_batch_end"),  # mid-epoch
        (6, "on_train_batch_end"),  # the last batch of epoch 0
        (8, "on_train_batch_end"),  # mid epoch 1: the order must be epoch 1's
        (5, "on_validation_batch_end"),  # during validation
        (10, "on_validation_end"),  # after validation, before the next batch
    ],
)
def test_crash_then_resume_equals_the_uninterrupted_run(straight, tmp_path, step, hook) -> None:
    data = straight[0]
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(data, tmp_path / "run", CrashAt(step, hook))
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == step
    assert not (tmp_path / "run" / "hf").exists(), "an interrupted fit exports nothing"
    record = RecordBatches()
    resumed = _fit(data, tmp_path / "run", record, ckpt_path="last")
    _assert_continues(straight, tmp_path / "run", resumed, record)


def _subprocess_fit(data: Path, run: Path, signal_name: str, step: int) -> subprocess.CompletedProcess:
    callbacks = [
        {"class_path": "atspeed.callbacks.export.ExportHuggingFace", "init_args": {"dirpath": str(run / "hf")}},
        {
            "class_path": "tests.integration.interrupts.SignalAt",
            "init_args": {"signal_name": signal_name, "step": step},
        },
    ]
    args = [*_args(data, run), "--trainer.callbacks", json.dumps(callbacks)]
    return run_cli("fit", args)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signal_name", "step", "returncode", "saved_step"),
    [
        ("SIGTERM", 7, SIGTERM_EXIT, 7),  # saves the step it finished, exits non-zero for the scheduler
        ("SIGINT", 11, 1, 11),  # Ctrl-C: the same, exit 1
        ("SIGKILL", 9, -signal.SIGKILL, 8),  # nothing runs: the periodic checkpoint of step 8 is what is left
    ],
)
def test_killed_subprocess_resumes_exactly(straight, tmp_path, signal_name, step, returncode, saved_step) -> None:
    done = _subprocess_fit(straight[0], tmp_path / "run", signal_name, step)
    assert done.returncode == returncode, done.stderr[-3000:]
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == saved_step
    assert not (tmp_path / "run" / "hf").exists()
    record = RecordBatches()
    resumed = _fit(straight[0], tmp_path / "run", record, ckpt_path="last")
    _assert_continues(straight, tmp_path / "run", resumed, record)


@pytest.mark.parametrize("every", [4, 7])
def test_a_finished_fit_leaves_last_ckpt_at_its_final_step(straight, tmp_path, every) -> None:
    # every 4: the periodic saves stop at 12 and the final step must be saved too; every 7: 14 is a periodic step
    data = straight[0]
    cli = main([*_args(data, tmp_path / "run"), "--checkpoint.every_n_train_steps", str(every)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS
    assert not [name for name in checkpoints if name.startswith("last-")], checkpoints
    # extending the finished run continues from its end
    longer = ["--trainer.max_steps", str(STEPS + 3), "--checkpoint.every_n_train_steps", str(every)]
    cli = main([*_args(data, tmp_path / "run"), *longer], run=False)
    record = RecordBatches()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path="last")
    assert [row[0] for row in record.rows] == [STEPS, STEPS + 1, STEPS + 2]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("last-")]
