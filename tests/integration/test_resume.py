"""Resume is exact: interrupted at any point (the first batch, mid-epoch, an epoch's last batch, in a later epoch,
during or after validation, after the final step; a crash, SIGTERM, Ctrl-C, SIGKILL), ``fit --ckpt_path last`` trains
on the same batches in the same order, logs the same values and ends with the same weights as a run that was never
interrupted: for target SFT and for draft alignment (on-policy, whose mixing generator travels in the checkpoint)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from atspeed.cli import SIGTERM_EXIT, main
from tests.integration.interrupts import CrashAt, RecordBatches, SignalAt
from tests.integration.tiny_data import align_args, run_cli, tiny_args, write_processed

# 6 batches per epoch on the tiny data: 14 steps cross two epoch ends; validation at steps 5 and 10 (mid-epoch);
# periodic checkpoints every 4 steps
STEPS = 14
SCHEDULE = [
    "--trainer.max_steps", str(STEPS),
    "--trainer.val_check_interval", "5",
    "--trainer.log_every_n_steps", "1",
    "--checkpoint.every_n_train_steps", "4",
    "--trainer.num_sanity_val_steps", "0",
]  # fmt: skip


def _args(data: Path, run: Path, *extra: str) -> list[str]:
    return tiny_args(data, run, *SCHEDULE, *extra)


def _fit_args(args: list[str], *callbacks, ckpt_path: str | None = None):
    cli = main(args, run=False)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli


def _fit(data: Path, run: Path, *callbacks, ckpt_path: str | None = None):
    return _fit_args(_args(data, run), *callbacks, ckpt_path=ckpt_path)


def _logged(run: Path, version: int) -> dict[tuple[str, int], float]:
    """(metric, step) -> value from the CSV log of one run (version) of ``run``."""
    path = run / "logs" / f"version_{version}" / "metrics.csv"
    if not path.exists():  # killed before its logger wrote
        return {}
    with open(path) as handle:
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
    ("step", "hook", "saved_step"),
    [
        (3, "on_train_batch_end", 3),  # mid-epoch
        (6, "on_train_batch_end", 6),  # the last batch of epoch 0
        (8, "on_train_batch_end", 8),  # mid epoch 1: the order must be epoch 1's
        (5, "on_validation_batch_end", 5),  # during validation
        (10, "on_validation_end", 10),  # after validation, before the next batch
        (9, "on_before_optimizer_step", 8),  # inside step 10 (an out-of-memory error): the periodic save of 8 stays
    ],
)
def test_crash_then_resume_equals_the_uninterrupted_run(straight, tmp_path, step, hook, saved_step) -> None:
    data = straight[0]
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(data, tmp_path / "run", CrashAt(step, hook))
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == saved_step
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
        ("SIGTERM", 6, SIGTERM_EXIT, 6),  # an epoch's last batch: saves the step, exits non-zero for the scheduler
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


# Stops in a chain, each resumed with --ckpt_path last: (signal, sent at hook, at optimizer step, what last.ckpt
# holds). The signal arrives while a step runs (its batch start: global_step is the steps done) or a validation.
SFT_STOPS = [
    ("SIGTERM", "on_train_batch_start", 0, 1),  # the first batch
    ("SIGINT", "on_before_optimizer_step", 3, 4),  # Ctrl-C inside step 4's optimizer step: stops at the step's end
    ("SIGTERM", "on_train_batch_start", 5, 6),  # the last batch of epoch 0
    ("SIGINT", "on_validation_batch_end", 10, 10),  # during validation: it finishes and is logged, then the run stops
    ("SIGTERM", "on_train_batch_start", STEPS - 1, STEPS),  # the final step: exports, then exits 143 all the same
]


@pytest.fixture
def ctrl_c():
    """Ctrl-C raises ``KeyboardInterrupt`` in this process, as in a terminal (a background job ignores it)."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, saved)


def _stop_and_resume(args: list[str], straight, run: Path, stops, resumed_from: int = 0) -> None:
    """Stop the fit of ``args`` at each of ``stops`` in turn (the signal sent in-process), resuming each time (the
    first time from ``resumed_from``'s last.ckpt, if not 0), then finish it: every part trains on the uninterrupted
    run's batches, and the parts end with its weights and log its values, each at least once from ``resumed_from`` on
    (what a SIGKILL stopped before it had not written is lost)."""
    _, rows, weights, logged = straight
    complete_from = resumed_from
    for name, hook, step, saved in stops:
        record = RecordBatches()
        with pytest.raises(SIGTERMException if name == "SIGTERM" else SystemExit) as stopped:
            _fit_args(args, record, SignalAt(name, step, hook=hook), ckpt_path="last" if resumed_from else None)
        assert name == "SIGTERM" or stopped.value.code == 1
        assert record.rows == rows[resumed_from:saved], f"{name} at step {step}: the batches trained"
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == saved
        assert (run / "hf").exists() == (saved == len(rows)), "only a fit stopped after its final step exports"
        resumed_from = saved
    record = RecordBatches()
    cli = _fit_args(args, record, ckpt_path="last")
    assert record.rows == rows[resumed_from:]
    state = cli.model.export_model().state_dict()
    for name, tensor in weights.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
    parts = [_logged(run, version) for version in range(len(list((run / "logs").iterdir())))]
    for part in parts:
        assert {key: logged.get(key) for key in part} == part, "every logged value is the uninterrupted run's"
    seen = {key for part in parts for key in part}
    assert {key for key in logged if key[1] >= complete_from} <= seen, "every value logged at least once"


def test_signals_at_every_stop_point_resume_exactly(straight, tmp_path, ctrl_c) -> None:
    _stop_and_resume(_args(straight[0], tmp_path / "run"), straight, tmp_path / "run", SFT_STOPS)


# Alignment, on-policy: 6 batches an epoch, validation every 4 steps, periodic checkpoints every 3
ALIGN_SCHEDULE = [
    "--model.init_args.teacher", "on_policy",
    "--trainer.max_steps", "8",
    "--trainer.log_every_n_steps", "1",
    "--checkpoint.every_n_train_steps", "3",
    "--trainer.num_sanity_val_steps", "0",
]  # fmt: skip
ALIGN_STOPS = [
    ("SIGINT", "on_validation_batch_end", 4, 4),  # Ctrl-C during validation
    ("SIGTERM", "on_train_batch_start", 5, 6),  # the last batch of epoch 0
    ("SIGTERM", "on_train_batch_start", 7, 8),  # the final step
]


@pytest.fixture(scope="module")
def aligned(exported, teacher_data, tmp_path_factory):
    """The uninterrupted on-policy alignment: (its arguments for a run dir, batches seen, final weights, logged)."""

    def args(run: Path) -> list[str]:
        return align_args(exported, teacher_data, run, *ALIGN_SCHEDULE)

    root = tmp_path_factory.mktemp("aligned")
    record = RecordBatches()
    cli = _fit_args(args(root / "run"), record)
    flags = {value for (key, _), value in _logged(root / "run", 0).items() if key == "train/on_policy"}
    assert flags == {0.0, 1.0}, "both kinds of batches, so the mixing generator's state matters"
    weights = {k: v.clone() for k, v in cli.model.export_model().state_dict().items()}
    return args, record.rows, weights, _logged(root / "run", 0)


@pytest.mark.slow
def test_alignment_resumes_exactly_after_sigkill_and_signals(aligned, tmp_path, ctrl_c) -> None:
    """SIGKILL (a real process) after the periodic checkpoint of step 3 and before the next one, then the stops of
    ``ALIGN_STOPS`` in turn, resumed each time: the same batches, on-policy draws, weights and logged values."""
    args = aligned[0](tmp_path / "run")
    kill = {"class_path": "tests.integration.interrupts.SignalAt", "init_args": {"signal_name": "SIGKILL", "step": 4}}
    export = {
        "class_path": "atspeed.callbacks.export.ExportHuggingFace",
        "init_args": {"dirpath": str(tmp_path / "run" / "hf")},
    }
    callbacks = [export, kill]
    done = run_cli("fit", [*args, "--trainer.callbacks", json.dumps(callbacks)])
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    _stop_and_resume(args, (None, *aligned[1:]), tmp_path / "run", ALIGN_STOPS, resumed_from=3)
