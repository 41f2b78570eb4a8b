"""DeepSpeed end to end on two CPU processes (scripts/torchrun.sh, gloo) through Lightning's own DeepSpeedStrategy
(``deepspeed_cpu.CpuDeepSpeedStrategy`` lifts only its CUDA-only checks): target SFT under ZeRO-2 and ZeRO-3 trains as
one process does, writes DeepSpeed's sharded checkpoint and a complete export; ``python -m atspeed export`` turns that
checkpoint into one file and the same export; draft alignment trains the draft alone.

The DeepSpeed configs are the shipped ``configs/deepspeed/zero{2,3}.json`` with two changes: fp32 instead of bf16
(bf16 runs on CPU too, but rounds the weights away from the one-process run's), and for ZeRO-3
``stage3_param_persistence_threshold: 0``: DeepSpeed keeps any parameter under 100k elements whole, so without it
none of a tiny model's parameters would be partitioned and the test would prove nothing about ZeRO-3.

"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from atspeed.cli import main
from atspeed.data.export_dir import META_FILE
from atspeed.export_checkpoint import main as export_main
from tests.integration.test_multinode import _free_port
from tests.integration.tiny_data import ROOT, align_args, tiny_args, write_processed

STRATEGY = "tests.integration.deepspeed_cpu.CpuDeepSpeedStrategy"
STEPS = ["--trainer.max_steps", "4"]  # the validation at step 4 runs under DeepSpeed too


def _deepspeed_json(stage: int, root: Path) -> Path:
    """``configs/deepspeed/zero<stage>.json`` in fp32, ZeRO-3 partitioning every parameter (module docstring)."""
    config = json.loads((ROOT / f"configs/deepspeed/zero{stage}.json").read_text())
    assert config.pop("bf16") == {"enabled": True}
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = root / f"zero{stage}_fp32.json"
    path.write_text(json.dumps(config))
    return path


def _strategy(stage: int, root: Path) -> list[str]:
    strategy = {"class_path": STRATEGY, "init_args": {"config": str(_deepspeed_json(stage, root))}}
    return ["--trainer.strategy", json.dumps(strategy)]


def _launch(args: list[str], cwd: Path, timeout: float = 240) -> None:
    """``scripts/torchrun.sh fit <args>`` with 2 CPU processes (gloo), DeepSpeed on its CPU accelerator even where a
    GPU exists. A run past ``timeout`` (ranks waiting forever in a collective) gets SIGTERM, which torchrun passes on
    to its workers, so no rank outlives the test."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT),
           "PYTHON": sys.executable, "NPROC_PER_NODE": "2", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}  # fmt: skip
    command = ["bash", str(ROOT / "scripts/torchrun.sh"), "fit", *args]
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        try:
            _, stderr = run.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.terminate()  # bash exec'd torchrun: it stops its workers (SIGTERM, then SIGKILL after 30 s)
            _, stderr = run.communicate(timeout=90)
            pytest.fail(f"no end after {timeout} s (ranks waiting for each other?):\n{stderr[-4000:]}")
    assert run.returncode == 0, stderr[-4000:]


def _weights(export: Path) -> dict[str, torch.Tensor]:
    (path,) = export.glob("*.safetensors")
    return load_file(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_processed(tmp_path_factory.mktemp("deepspeed") / "data")


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> Path:
    """The same tiny SFT without DeepSpeed: one process with the global batch (16) of two DeepSpeed ranks of 8."""
    run = tmp_path_factory.mktemp("one") / "run"
    main(["fit", *tiny_args(data, run, *STEPS)])
    return run


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero_run(request, data, tmp_path_factory) -> tuple[int, Path]:
    """(stage, run directory) of target SFT on 2 torchrun CPU processes under ZeRO-<stage>, batch 8 per process."""
    stage, root = request.param, tmp_path_factory.mktemp(f"zero{request.param}")
    _launch(tiny_args(data, root / "run", "--data.batch_size", "8", *STEPS, *_strategy(stage, root)), root)
    return stage, root / "run"


@pytest.mark.slow
def test_zero_sft_writes_a_sharded_checkpoint_and_a_complete_export_at_the_one_process_weights(
    zero_run, one_process
) -> None:
    """DeepSpeed's checkpoint holds one optimizer partition per rank (ZeRO-3: model states too); the export, gathered
    from the partitions under ZeRO-3, has every key and shape of the one-process export and its weights: the same
    global batch in fp32, so only the order of float sums differs (measured <= 6e-8; a global batch of 32 instead
    moves weights by 0.03, far outside atol 2e-4)."""
    stage, run = zero_run
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / "latest").read_text().strip() == "checkpoint"
    files = sorted(p.name for p in (ckpt / "checkpoint").iterdir())
    per_rank = ["optim"] if stage == 2 else ["optim", "model"]
    shared = ["mp_rank_00_model_states.pt"] if stage == 2 else []
    assert files == sorted(shared + [f"zero_pp_rank_{r}_mp_rank_00_{s}_states.pt" for r in (0, 1) for s in per_rank])
    ours, reference = _weights(run / "hf"), _weights(one_process / "hf")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, atol=2e-4, rtol=1e-3, msg=name)


@pytest.mark.slow
def test_export_command_turns_the_zero_checkpoint_into_one_file_and_the_fits_own_export(zero_run, tmp_path) -> None:
    """``python -m atspeed export CKPT --out DIR --single-file FILE``: FILE is a plain Lightning checkpoint (loads
    with weights_only=True, the module's full fp32 weights), DIR equals the fit's export file for file (atspeed.json
    apart from its export_id), and FILE given back as CKPT exports the same weights."""
    _, run = zero_run
    single, out = tmp_path / "last_fp32.ckpt", tmp_path / "hf"
    export_main([str(run / "checkpoints" / "last.ckpt"), "--out", str(out), "--single-file", str(single)])
    checkpoint = torch.load(single, map_location="cpu", weights_only=True)
    fit_weights = _weights(run / "hf")
    assert checkpoint["state_dict"].keys() == {f"model.{name}" for name in fit_weights}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (run / "hf").iterdir())
    for path in out.iterdir():
        if path.suffix != ".safetensors" and path.name != META_FILE:
            assert path.read_bytes() == (run / "hf" / path.name).read_bytes(), path.name
    meta, fit_meta = (json.loads((d / META_FILE).read_text()) for d in (out, run / "hf"))
    assert meta.pop("export_id") != fit_meta.pop("export_id") and meta == fit_meta and meta["global_step"] == 4
    for export in (out, _export_again(single, tmp_path / "again")):
        weights = _weights(export)
        assert weights.keys() == fit_weights.keys()
        assert all(torch.equal(weights[name], fit_weights[name]) for name in fit_weights), export


def _export_again(single: Path, out: Path) -> Path:
    export_main([str(single), "--out", str(out)])
    return out


# Alignment's validation decodes speculatively: how many draft forwards a batch takes depends on its data, so under
# ZeRO-3 it decodes with a whole copy of the draft gathered once (each forward of the partitioned draft would be a
# collective, and ranks would wait for each other forever). The ZeRO-3 run also recomputes the target's
# distributions in training (teacher: recompute), so the target runs inside DeepSpeed's steps too.
ALIGN_EXTRA = {2: [], 3: ["--model.init_args.teacher", "recompute"]}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_draft_alignment_under_zero_trains_and_partitions_the_draft_alone(stage, exported, teacher_data, tmp_path):
    """The frozen target lives outside the module: DeepSpeed's engine holds the draft's parameters only (under
    ZeRO-3 all of them partitioned), its optimizer state covers exactly the draft's (the checkpoint's param_shapes),
    while the target, loaded for validation (ZeRO-2) or training (ZeRO-3), is neither in the engine nor partitioned
    nor trainable; the export command rebuilds the alignment module and writes the fit's export."""
    report = tmp_path / "parameters.json"
    probe = {"class_path": "tests.integration.deepspeed_cpu.ParameterReport", "init_args": {"path": str(report)}}
    extra = ["--data.batch_size", "8", *STEPS, *_strategy(stage, tmp_path), "--trainer.callbacks+", json.dumps(probe)]
    extra += ALIGN_EXTRA[stage]
    _launch(align_args(exported, teacher_data, tmp_path / "run", *extra), tmp_path)
    draft = _weights(tmp_path / "run" / "hf")
    names = sorted(f"draft.{name}" for name in draft)
    seen = json.loads(report.read_text())
    assert seen["engine"] == "DeepSpeedEngine" and seen["engine_holds"] == names
    assert seen["partitioned"] == (names if stage == 3 else [])
    assert seen["target_loaded"] and seen["target_in_engine"] == seen["target_partitioned"] == 0
    assert seen["target_trainable"] == 0
    (log,) = (tmp_path / "run").glob("logs/version_*/metrics.csv")
    rows = list(csv.DictReader(log.read_text().splitlines()))
    assert any(row.get("val/mean_accepted_depth") for row in rows)  # validation decoded (ZeRO-3: a gathered draft)
    states = sorted((tmp_path / "run" / "checkpoints" / "last.ckpt" / "checkpoint").glob("*model_states.pt"))[0]
    shapes = torch.load(states, map_location="cpu", weights_only=True)["param_shapes"]
    held = {name: tuple(shape) for group in shapes for name, shape in group.items()}
    assert held == {f"draft.{name}": tuple(value.shape) for name, value in draft.items()}
    export_main([str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "hf")])
    again = _weights(tmp_path / "hf")
    assert again.keys() == draft.keys() and all(torch.equal(again[k], draft[k]) for k in draft)


def _fake_checkpoint(path: Path, **entries) -> Path:
    torch.save({"state_dict": {}, **entries}, path)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "error: CKPT: checkpoint not found: {tmp}/nowhere.ckpt"),
        ("text", "error: CKPT: {tmp}/notes.ckpt is not a PyTorch checkpoint"),
        ("directory", "error: CKPT: {tmp}/folder is a directory but not a DeepSpeed checkpoint (no latest file)"),
        ("foreign", "error: CKPT: {tmp}/foreign.ckpt lacks the module class, data hyper-parameters or weights"),
        ("out", "error: --out: {tmp}/mine exists and was not written by atspeed"),
        ("single", "error: --single-file: {tmp}/single.ckpt exists; refusing to replace it"),
    ],
)  # fmt: skip
def test_export_command_refuses_bad_input_in_one_line_before_building_anything(case, message, tmp_path, capsys,
                                                                                monkeypatch):  # fmt: skip
    """Exit 2 with one ``error:`` line naming the path; the data module (built before any model) is never reached."""
    import atspeed.export_checkpoint as command

    monkeypatch.setattr(command, "build_datamodule", lambda *a: pytest.fail("built the data module"))
    hparams = {"hyper_parameters": {"_class_path": "atspeed.modules.sft.SFT"}, "datamodule_hyper_parameters": {}}
    ckpt, out = tmp_path / "ok.ckpt", tmp_path / "hf"
    _fake_checkpoint(ckpt, **hparams)
    if case == "missing":
        ckpt = tmp_path / "nowhere.ckpt"
    elif case == "text":
        ckpt = tmp_path / "notes.ckpt"
        ckpt.write_text("not a checkpoint")
    elif case == "directory":
        ckpt = tmp_path / "folder"
        ckpt.mkdir()
    elif case == "foreign":
        ckpt = _fake_checkpoint(tmp_path / "foreign.ckpt", hyper_parameters={"lr": 1.0})
    elif case == "out":
        out = tmp_path / "mine"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "latest").write_text("checkpoint")
    (tmp_path / "zero" / "checkpoint").mkdir()
    (tmp_path / "zero" / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (tmp_path / "single.ckpt").write_text("earlier")
    args = [str(ckpt), "--out", str(out)]
    if case == "single":
        args = [str(tmp_path / "zero"), "--out", str(out), "--single-file", str(tmp_path / "single.ckpt")]
    with pytest.raises(SystemExit) as exit_info:
        export_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message.format(tmp=tmp_path)), err
    assert not out.exists() or (out / "keep.txt").read_text() == "mine"
