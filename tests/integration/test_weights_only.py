"""Nothing is ever run from a file atspeed reads: a pickle that would run code (here one that creates a marker file
when unpickled) planted in any checkpoint or model file an entry point reads is refused in one ``error:`` line naming
the file (exit 2, no traceback), before a model is built, and the marker never appears. Teacher data is safetensors
and JSON (no code to run), so it needs no case here."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from atspeed.export_checkpoint import main as export_main
from tests.integration.test_bad_input import fails, no_model_built  # noqa: F401 (autouse: no model is ever built)
from tests.integration.tiny_data import (
    align_args,
    decode_args,
    teacher_args,
    tiny_args,
    tiny_hf_checkpoint,
    write_processed,
)


class Payload:
    """Unpickling this creates the file ``path``: proof that a file's pickled code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def export_fails(args: list[str], capsys, marker: Path) -> str:
    """Run ``python -m atspeed export`` expecting no ``marker``, exit 2 with one ``error:`` line and no traceback;
    return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        export_main(args)
    assert not marker.exists(), "the checkpoint's pickled code ran"
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    messages = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(messages) == 1 and "Traceback" not in err, err
    return messages[0]


def no_advice_to_allow(err: str) -> None:
    """The refusal names what the file holds, without torch's advice on how to allow it (that is for files one
    trusts)."""
    assert "refused" in err and "add_safe_globals" not in err and "safe_globals(" not in err, err


# -- DeepSpeed ZeRO directories (python -m atspeed export) ------------------------------------------


def zero_directory(root: Path, poisoned: str | None, marker: Path) -> Path:
    """A ZeRO-2 checkpoint directory as DeepSpeed lays it out (``latest``, one tag directory, model states and one
    rank's optimizer states, holding what Lightning's converter reads), ``poisoned`` (model/optim) holding a payload."""
    tag = root / "global_step8"
    tag.mkdir(parents=True)
    (root / "latest").write_text("global_step8")
    model = {"module": {}, "buffer_names": [], "param_shapes": [{"w": torch.Size([4])}], "shared_params": {}}
    optim = {"optimizer_state_dict": {"zero_stage": 2, "partition_count": 1,
                                      "single_partition_of_fp32_groups": [torch.zeros(4)]}}  # fmt: skip
    for kind, states in (("model", model), ("optim", optim)):
        states = {**states, "payload": Payload(marker)} if kind == poisoned else states
        name = "mp_rank_00_model_states.pt" if kind == "model" else "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        torch.save(states, tag / name)
    return root


@pytest.mark.parametrize("poisoned", ["model", "optim"])
def test_a_zero_directory_holding_code_is_refused(poisoned, tmp_path, capsys) -> None:
    pytest.importorskip("deepspeed")
    marker = tmp_path / "payload-ran"
    ckpt = zero_directory(tmp_path / "last.ckpt", poisoned, marker)
    err = export_fails([str(ckpt), "--out", str(tmp_path / "hf")], capsys, marker)
    assert err.startswith(f"error: CKPT: {ckpt}/global_step8/") and f"{poisoned}_states.pt refused" in err, err
    no_advice_to_allow(err)
    assert not (tmp_path / "hf").exists()


def test_the_zero_conversion_itself_loads_weights_only(tmp_path, capsys, monkeypatch) -> None:
    """Should a file change after it was checked, DeepSpeed's and Lightning's converters (which pass
    weights_only=False) still load it weights-only: the checks skipped, the payload is refused all the same."""
    pytest.importorskip("deepspeed")
    monkeypatch.setattr("atspeed.export_checkpoint.check_zero_directory", lambda path: None)
    marker = tmp_path / "payload-ran"
    ckpt = zero_directory(tmp_path / "last.ckpt", "optim", marker)
    args = [str(ckpt), "--out", str(tmp_path / "hf"), "--single-file", str(tmp_path / "one.ckpt")]
    err = export_fails(args, capsys, marker)
    assert err.startswith(f"error: CKPT: {ckpt} refused"), err
    no_advice_to_allow(err)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "one.ckpt").exists()
    left = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".atspeed.lock")]  # the export's lock file
    assert left == ["last.ckpt"], "no temporary file left"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ, "the forcing ends with the conversion"


def test_a_zero_directory_without_optimizer_states_is_refused(tmp_path, capsys) -> None:
    ckpt = zero_directory(tmp_path / "last.ckpt", None, tmp_path / "payload-ran")
    (ckpt / "global_step8" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    err = export_fails([str(ckpt), "--out", str(tmp_path / "hf")], capsys, tmp_path / "payload-ran")
    assert err.startswith(f"error: CKPT: {ckpt}: global_step8 holds no optimizer states"), err


# -- single-file checkpoints -----------------------------------------------------------------------


def test_a_single_file_checkpoint_holding_code_is_refused_by_every_entry_point(tmp_path, capsys) -> None:
    """``--ckpt_path`` of fit, validate, test and predict, and the export command's CKPT."""
    data, marker, bad = write_processed(tmp_path / "data"), tmp_path / "payload-ran", tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "payload": Payload(marker)}, bad)
    for subcommand in ("fit", "validate", "test", "predict"):
        err = fails([*tiny_args(data, tmp_path / "run"), "--ckpt_path", str(bad)], capsys, subcommand)
        assert err.startswith(f"error: --ckpt_path: {bad} refused"), err
        no_advice_to_allow(err)
    err = export_fails([str(bad), "--out", str(tmp_path / "hf")], capsys, marker)
    assert err.startswith(f"error: CKPT: {bad} refused"), err
    no_advice_to_allow(err)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "hf").exists()


# -- model directories (pytorch_model.bin) ---------------------------------------------------------


def poisoned_model(source: Path, copy: Path, marker: Path) -> Path:
    """A copy of model directory ``source`` whose weights are a ``pytorch_model.bin`` holding a payload."""
    shutil.copytree(source, copy)
    for weights in copy.glob("*.safetensors"):
        weights.unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": Payload(marker)}, copy / "pytorch_model.bin")
    return copy


@pytest.mark.parametrize(
    ("stage", "role"),
    [("sft", "model.path"), ("align", "target"), ("align", "draft_init"), ("predict", "target"),
     ("predict", "draft"), ("teacher", "target")],
)  # fmt: skip
def test_a_model_directory_holding_code_is_refused_by_every_stage(stage, role, exported, teacher_data, tmp_path,
                                                                   capsys) -> None:  # fmt: skip
    data, target, draft = exported
    marker = tmp_path / "payload-ran"
    if stage == "sft":
        bad = poisoned_model(tiny_hf_checkpoint(tmp_path / "llama"), tmp_path / "bad", marker)
        args, subcommand = tiny_args(data, tmp_path / "run", "--model.init_args.model.path", str(bad)), "fit"
    else:
        bad = poisoned_model(draft if role.startswith("draft") else target, tmp_path / "bad", marker)
        option = ["--model.init_args." + role, str(bad)]
        args, subcommand = {
            "align": (align_args(exported, teacher_data, tmp_path / "run", *option), "fit"),
            "predict": (decode_args(exported, tmp_path / "run", *option), "predict"),
            "teacher": (teacher_args(exported, tmp_path / "run", *option), "predict"),
        }[stage]
    err = fails(args, capsys, subcommand)
    assert f"{bad}/pytorch_model.bin refused: it holds objects other than tensors" in err, err
    no_advice_to_allow(err)
    assert not marker.exists(), "the model file's pickled code ran"
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "p.jsonl").exists()
