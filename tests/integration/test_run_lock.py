"""One run per output directory (``atspeed.run_lock``): a second run into a directory in use stops at once with one
line (exit 2) and the first run's outputs are whole; the lock goes with the run however it ends; every entry point
locks its own directories, a pipeline's stages re-enter the pipeline's lock, and only rank 0 of a launch locks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from atspeed.cli import main
from atspeed.errors import SIGTERM_EXIT, DataError
from atspeed.export_checkpoint import main as export_main
from atspeed.pipeline import main as pipeline_main
from atspeed.run_lock import LOCK_NAME, leads_run, locked, sibling_lock_file
from tests.integration.lock_holder import held_by_another_process, is_free
from tests.integration.test_bad_input import fails
from tests.integration.tiny_data import (
    DECODE_CONFIG,
    ROOT,
    start_cli,
    teacher_args,
    tiny_args,
    write_processed,
)

EXPORT = "atspeed.callbacks.export.ExportHuggingFace"


def _wait_until_waiting(go: Path, child) -> None:
    """Until the run ``child`` waits for ``go`` (``WaitForFile``): past its start, holding its locks."""
    deadline = time.monotonic() + 240
    while not go.with_name(go.name + ".waiting").exists():
        assert child.poll() is None, child.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the first run never started"
        time.sleep(0.1)


def _refuse_models(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built by the run that should have stopped")

    for name in ("sft.build_causal_lm", "recommend.load_model", "teacher.load_model"):
        monkeypatch.setattr(f"atspeed.modules.{name}", refuse)


def _in_use(err: str, directory: Path, pid: int) -> None:
    assert "is in use by another atspeed run" in err and str(directory) in err and f"pid {pid}," in err, err


@pytest.mark.slow
def test_a_second_fit_into_a_run_directory_in_use_stops_and_the_first_finishes(tmp_path, capsys, monkeypatch) -> None:
    data = write_processed(tmp_path / "data")
    run, go = tmp_path / "run", tmp_path / "go"
    wait = {"class_path": "tests.integration.interrupts.WaitForFile", "init_args": {"path": str(go)}}
    callbacks = [{"class_path": EXPORT, "init_args": {"dirpath": str(run / "hf")}}, wait]
    first = start_cli(
        "fit", [*tiny_args(data, run, "--trainer.max_steps", "2"), "--trainer.callbacks", json.dumps(callbacks)]
    )
    try:
        _wait_until_waiting(go, first)
        with monkeypatch.context() as patch:
            _refuse_models(patch)
            err = fails(tiny_args(data, run), capsys)  # a fresh fit into the same run directory
        assert "trainer.default_root_dir" in err
        _in_use(err, run, first.pid)
    finally:
        go.touch()
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]
    assert json.loads((run / "hf" / "atspeed.json").read_text())["global_step"] == 2
    assert (run / LOCK_NAME).read_text() == "" and is_free(run / LOCK_NAME)


@pytest.mark.slow
def test_a_second_predict_into_a_directory_in_use_stops_and_the_first_finishes(exported, tmp_path, capsys) -> None:
    """The reported case: K = 3 and K = 2 into one ``default_root_dir`` (the config's own output names)."""
    data, target, draft = exported
    out, go = tmp_path / "decode", tmp_path / "go"
    common = ["--config", DECODE_CONFIG, "--data.source.init_args.path", str(data),
              "--model.init_args.target", str(target), "--model.init_args.draft", str(draft),
              "--trainer.default_root_dir", str(out)]  # fmt: skip
    wait = {"class_path": "tests.integration.interrupts.WaitForFile", "init_args": {"path": str(go)}}
    callbacks = [{"class_path": "atspeed.callbacks.predictions.JsonlPredictionWriter"},
                 {"class_path": "atspeed.callbacks.decode_report.DecodeReport"}, wait]  # fmt: skip
    first = start_cli("predict", [*common, "--trainer.callbacks", json.dumps(callbacks)])
    try:
        _wait_until_waiting(go, first)
        second = [*common, "--model.init_args.decoding.num_beams", "2", "--model.init_args.eval_ks", "[1, 2]"]
        _in_use(fails(second, capsys, "predict"), out, first.pid)
    finally:
        go.touch()
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len({row["request"] for row in rows}) == 24  # each test request once
    assert all(len(row["items"]) == 3 for row in rows)  # K = 3 throughout: nothing of the K = 2 run
    assert json.loads((out / "report.json").read_text())["settings"]["num_beams"] == 3
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "config.yaml", "predictions.jsonl", "report.json"]
    assert "num_beams: 3" in (out / "config.yaml").read_text()


def test_the_lock_goes_with_the_run_after_success_error_and_sigterm(tmp_path, capsys) -> None:
    data = write_processed(tmp_path / "data")
    run = tmp_path / "run"
    main(["fit", *tiny_args(data, run, "--trainer.max_steps", "1")])
    assert (run / LOCK_NAME).read_text() == "" and is_free(run / LOCK_NAME)
    err = fails([*tiny_args(data, run), "--ckpt_path", str(tmp_path / "absent.ckpt")], capsys, "validate")
    assert "checkpoint not found" in err and is_free(run / LOCK_NAME)
    three = ["--ckpt_path", "last", "--trainer.max_steps", "3"]
    callbacks = [{"class_path": EXPORT, "init_args": {"dirpath": str(run / "hf")}},
                 {"class_path": "tests.integration.interrupts.SignalAt",
                  "init_args": {"signal_name": "SIGTERM", "step": 2}}]  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        main(["fit", *tiny_args(data, run, *three, "--trainer.callbacks", json.dumps(callbacks))])
    assert stopped.value.code == SIGTERM_EXIT and is_free(run / LOCK_NAME)
    main(["fit", *tiny_args(data, run, *three)])  # the next run starts, and resumes
    assert json.loads((run / "hf" / "atspeed.json").read_text())["global_step"] == 3


def test_teacher_data_in_use_is_refused(exported, tmp_path, capsys, monkeypatch) -> None:
    _refuse_models(monkeypatch)
    with held_by_another_process(sibling_lock_file(tmp_path / "data")) as pid:
        err = fails(teacher_args(exported, tmp_path), capsys, "predict")
    assert "TeacherShardWriter.dirpath" in err
    _in_use(err, tmp_path / "data", pid)


def _exits(entry, args: list[str], capsys, code: int = 2) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        entry(args)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_export_directory_in_use_is_refused(tmp_path, capsys) -> None:
    ckpt, out = tmp_path / "last.ckpt", tmp_path / "hf"
    ckpt.write_bytes(b"not read: the lock comes first")
    with held_by_another_process(sibling_lock_file(out)) as pid:
        err = _exits(export_main, [str(ckpt), "--out", str(out)], capsys)
    assert "--out" in err
    _in_use(err, out, pid)
    assert not out.exists()


def test_a_pipeline_directory_in_use_is_refused_and_its_stages_reenter_it(tmp_path, capsys, monkeypatch) -> None:
    root = tmp_path / "runs"
    stages = [{"name": "a", "run": "fit", "output": str(root / "a" / "hf")},
              {"name": "b", "run": "fit", "output": str(root / "hf")}]  # fmt: skip
    (tmp_path / "p.yaml").write_text(json.dumps({"stages": stages}))
    ran = []

    def stage_in_the_pipeline_directory(stage) -> None:  # a stage whose run directory is the pipeline's own
        with locked(root, "trainer.default_root_dir"):
            ran.append(stage.name)
            stage.output.mkdir(parents=True)

    monkeypatch.setattr("atspeed.pipeline.run_stage", stage_in_the_pipeline_directory)
    with held_by_another_process(root / LOCK_NAME) as pid:
        _in_use(_exits(pipeline_main, [str(tmp_path / "p.yaml")], capsys), root, pid)
    assert ran == []
    pipeline_main([str(tmp_path / "p.yaml")])
    assert ran == ["a", "b"] and is_free(root / LOCK_NAME)


def test_a_sweep_directory_in_use_is_refused(tmp_path, capsys) -> None:
    from atspeed.sweep import main as sweep_main

    sweep = ROOT / "sweeps" / "decode_n_gamma.yaml"
    out = tmp_path / "sweep"
    with held_by_another_process(out / LOCK_NAME) as pid:
        code = sweep_main([str(sweep), "--dir", str(out), "--count", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "--dir" in err
    _in_use(err, out, pid)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing checked, run or written


def test_locks_are_reentrant_in_one_process_and_name_the_holder(tmp_path) -> None:
    with locked(tmp_path / "d", "k"), locked(tmp_path / "d", "k"):
        assert json.loads((tmp_path / "d" / LOCK_NAME).read_text())["pid"] > 0
        assert not is_free(tmp_path / "d" / LOCK_NAME)
    assert is_free(tmp_path / "d" / LOCK_NAME)
    with pytest.raises(DataError, match=r"k: .* is not writable"):
        locked(Path("/proc/atspeed-lock-test"), "k").__enter__()


@pytest.mark.parametrize(
    ("env", "leads"),
    [
        ({}, True),
        ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, True),  # torchrun's rank 0
        ({"RANK": "1", "LOCAL_RANK": "1"}, False),
        ({"LOCAL_RANK": "1"}, False),  # Lightning's DDP launcher started this process for rank 1
        ({"NODE_RANK": "1"}, False),  # the launcher of the second node
        ({"SLURM_PROCID": "3"}, False),
    ],
)
def test_only_the_first_process_of_a_launch_locks(env, leads) -> None:
    assert leads_run(env) == leads
