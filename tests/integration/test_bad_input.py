"""Hostile inputs: each ends in one clear message naming the key, file or line (exit 2, no usage text, no
traceback), before any model is built, and loses nothing that was there. This file grows with every stage: add
the new stage's own cases here."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from atspeed.cli import main
from atspeed.models.tokenizer import build_word_tokenizer
from tests.integration.tiny_data import align_args, decode_args, teacher_args, tiny_args, write_processed


def fails(args: list[str], capsys, subcommand: str = "fit") -> str:
    """Run the CLI expecting exit 2; return stderr after checking it is one message, not usage text or a traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    messages = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(messages) == 1, err
    assert "usage:" not in err and "Traceback" not in err, err
    return messages[0]


@pytest.fixture
def data(tmp_path) -> Path:
    return write_processed(tmp_path / "data")


@pytest.fixture(autouse=True)
def no_model_built(monkeypatch) -> None:
    """Every case here must stop before a model is built or loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was reported")

    monkeypatch.setattr("atspeed.modules.sft.build_causal_lm", refuse)
    monkeypatch.setattr("atspeed.modules.recommend.load_model", refuse)
    monkeypatch.setattr("atspeed.modules.teacher.load_model", refuse)
    monkeypatch.setattr("atspeed.modules.align.build_causal_lm", refuse)
    monkeypatch.setattr("atspeed.modules.align.load_model", refuse)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (["--data.source", "csv"], "data.source"),
        (["--data.split", "random"], "data.split"),
        (["--data.batch_size", "-4"], "data.batch_size"),
        (["--data.max_history", "0"], "data.max_history"),
        (["--model.init_args.model.hidden_size", "-8"], "hidden_size"),
        (["--model.init_args.loss_on", "prompt"], "loss_on"),
        (
            ["--model.init_args.model.attn_implementation", "flash_attention_2"],
            "attn_implementation: Expected a typing.Literal",
        ),
        (["--data.index_file", "/no/such/index.json"], "data.index_file"),
        (["--data.prompt", "no history field"], "data.prompt"),
    ],
)
def test_invalid_config_values_fail_before_any_model_is_built(data, tmp_path, capsys, override, key) -> None:
    err = fails(tiny_args(data, tmp_path / "run", *override), capsys)
    assert key in err
    assert not (tmp_path / "run" / "hf").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_missing_dataset_directory(tmp_path, capsys) -> None:
    err = fails(tiny_args(tmp_path / "absent", tmp_path / "run"), capsys)
    assert "data.source.init_args.path" in err and "absent" in err


def test_malformed_line_names_file_and_line(data, tmp_path, capsys) -> None:
    lines = (data / "sequential_train.txt").read_text().splitlines()
    lines[4] = "4 1 two 3"
    (data / "sequential_train.txt").write_text("\n".join(lines) + "\n")
    err = fails(tiny_args(data, tmp_path / "run"), capsys)
    assert "sequential_train.txt:5" in err


def test_items_missing_from_the_index(data, tmp_path, capsys) -> None:
    index = json.loads((data / "tiny.index.json").read_text())
    del index["3"]
    (data / "tiny.index.json").write_text(json.dumps(index))
    err = fails(tiny_args(data, tmp_path / "run"), capsys)
    assert "not in index" in err and "'3'" in err


def test_duplicate_identifiers_fail_unless_resolved(data, tmp_path, capsys) -> None:
    index = json.loads((data / "tiny.index.json").read_text())
    index["5"] = index["4"]
    (data / "tiny.index.json").write_text(json.dumps(index))
    err = fails(tiny_args(data, tmp_path / "run"), capsys)
    assert "data.on_duplicate_ids" in err
    cli = main(tiny_args(data, tmp_path / "ok", "--data.on_duplicate_ids", "resolve"), run=False)
    cli.datamodule.setup("fit")
    assert len(set(cli.datamodule.prepared.index.codes)) == 16


def test_empty_after_filtering(data, tmp_path, capsys) -> None:
    err = fails(tiny_args(data, tmp_path / "run", "--data.source.init_args.kcore", "50"), capsys)
    assert "empty after filtering" in err and "kcore=50" in err


def test_tokenizer_without_identifier_tokens(data, tmp_path, capsys) -> None:
    build_word_tokenizer(["History: . Next:"], []).save_pretrained(tmp_path / "tok")
    args = tiny_args(
        data, tmp_path / "run", "--data.tokenizer", str(tmp_path / "tok"), "--data.extend_tokenizer", "false"
    )
    err = fails(args, capsys)
    assert "lacks 8 of 8 item identifier tokens" in err
    assert not (tmp_path / "run" / "hf").exists()


def test_prompt_longer_than_the_context(data, tmp_path, capsys) -> None:
    err = fails(tiny_args(data, tmp_path / "run", "--model.init_args.model.max_positions", "8"), capsys)
    assert "model.max_positions" in err and "exceed the model's context (8)" in err


def test_duplicate_key_in_the_index_names_file_and_line(data, tmp_path, capsys) -> None:
    index = json.loads((data / "tiny.index.json").read_text())
    lines = [f'"{key}": {json.dumps(codes)}' for key, codes in index.items()]
    lines.insert(9, '"3": ["<a_3>", "<b_0>"]')  # a second item "3", out of its codebook too
    (data / "tiny.index.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    err = fails(tiny_args(data, tmp_path / "run"), capsys)
    assert "tiny.index.json:11" in err and "duplicate key '3'" in err


@pytest.mark.parametrize("max_steps", ["-5", "-2"])
def test_negative_max_steps(data, tmp_path, capsys, max_steps) -> None:
    err = fails(tiny_args(data, tmp_path / "run", "--trainer.max_steps", max_steps), capsys)
    assert "trainer.max_steps" in err


def test_list_longer_than_the_number_of_items(data, tmp_path, capsys) -> None:
    err = fails(tiny_args(data, tmp_path / "run", "--model.init_args.eval_ks", "[1, 20]"), capsys)
    assert "model.eval_ks" in err and "K = 20 exceeds the 16 items" in err


def test_binary_config_file(data, tmp_path, capsys) -> None:
    config = tmp_path / "model.yaml"
    config.write_bytes(bytes(range(256)) * 4)
    err = fails([*tiny_args(data, tmp_path / "run"), "--config", str(config)], capsys)
    assert "model.yaml" in err


@pytest.mark.parametrize("kind", ["file", "under_a_file"])
def test_output_directory_that_cannot_be_one(data, tmp_path, capsys, kind) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("the user's file\n")
    out = blocker if kind == "file" else blocker / "run"
    err = fails([*tiny_args(data, tmp_path / "run"), "--trainer.default_root_dir", str(out)], capsys)
    assert "trainer.default_root_dir" in err and str(blocker) in err
    assert blocker.read_text() == "the user's file\n"


def test_read_only_output_directory(data, tmp_path, capsys, monkeypatch) -> None:
    root = tmp_path / "readonly"
    root.mkdir()
    real_access = os.access
    # root ignores permission bits, so the refusal the OS would give is simulated for this one directory
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != root and real_access(p, mode))
    err = fails([*tiny_args(data, tmp_path / "run"), "--trainer.default_root_dir", str(root / "run")], capsys)
    assert "trainer.default_root_dir" in err and "not writable" in err


def _tiny_checkpoint(tmp_path: Path, data: Path) -> Path:
    """A real checkpoint of a two-step fit (built outside the no-model-built guard)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.undo()
        import atspeed.models.build as build

        patch.setattr("atspeed.modules.sft.build_causal_lm", build.build_causal_lm)
        main(["fit", *tiny_args(data, tmp_path / "ok", "--trainer.max_steps", "2")])
    return tmp_path / "ok" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing", "not_a_checkpoint", "malicious"])
def test_bad_checkpoint_path(data, tmp_path, capsys, damage) -> None:
    bad = tmp_path / "bad.ckpt"
    proof = tmp_path / "payload-ran"
    if damage == "truncated":
        good = _tiny_checkpoint(tmp_path, data).read_bytes()
        bad.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "not_a_checkpoint":
        torch.save(torch.zeros(3), bad)
    elif damage == "malicious":
        torch.save({"state_dict": {}, "payload": _Payload(str(proof))}, bad)
    for subcommand in ("fit", "validate"):
        err = fails([*tiny_args(data, tmp_path / "run"), "--ckpt_path", str(bad)], capsys, subcommand)
        assert "--ckpt_path" in err and "bad.ckpt" in err
    assert not proof.exists(), "the checkpoint's pickled code ran"
    assert not (tmp_path / "run" / "checkpoints").exists()


class _Payload:
    """Unpickling this runs code: a weights-only load must refuse it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_fresh_fit_into_a_directory_with_a_last_checkpoint(data, tmp_path, capsys) -> None:
    last = _tiny_checkpoint(tmp_path, data)
    before = last.read_bytes()
    err = fails(tiny_args(data, tmp_path / "ok", "--trainer.max_steps", "2"), capsys)
    assert "--ckpt_path last" in err and str(last) in err
    assert last.read_bytes() == before


# -- predict ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.init_args.decoding.draft_beams", "2"], "draft_beams"),
        (["--model.init_args.decoding.gamma", "0"], "gamma"),
        (["--model.init_args.eval_ks", "[5]"], "eval_ks"),
        (
            ["--model.init_args.decoding.decoder", "beam", "--model.init_args.decoding.num_beams", "17"],
            "model.decoding.num_beams: K = 17 exceeds",
        ),
    ],
)
def test_bad_decode_settings_fail_before_loading(exported, tmp_path, capsys, extra, message) -> None:
    err = fails(decode_args(exported, tmp_path, *extra), capsys, "predict")
    assert message in err


@pytest.mark.parametrize(
    ("stage", "extra", "key"),
    [
        ("predict", ["--model.init_args.decoding.budget", "-1"], "model.init_args.decoding.budget"),
        ("predict", ["--model.init_args.decoding.budget", "all"], "model.init_args.decoding.budget"),
        ("predict", ["--model.init_args.decoding.decoder", "greedy"], "model.init_args.decoding.decoder"),
        ("predict", ["--model.init_args.decoding.gamma", "1.5"], "model.init_args.decoding.gamma"),
        ("align", ["--model.init_args.decoding.budget", "all"], "model.init_args.decoding.budget"),
        ("align", ["--model.init_args.decoding.num_beams", "0"], "model.init_args.decoding.num_beams"),
    ],
)
def test_bad_decoding_values_are_refused_at_parse_time(exported, tmp_path, capsys, extra, key, stage) -> None:
    """The ``decoding:`` block's types refuse these while parsing: ``--print_config`` already stops, naming the key,
    for the predict stage and for alignment's validation decode alike."""
    if stage == "predict":
        args, subcommand = decode_args(exported, tmp_path, *extra), "predict"
    else:
        args, subcommand = align_args(exported, tmp_path / "teacher", tmp_path, *extra), "fit"
    err = fails([*args, "--print_config"], capsys, subcommand)
    assert err.startswith(f"error: {key}: "), err


def test_a_draft_with_another_tokenizer_or_no_index_is_refused(exported, tmp_path, capsys) -> None:
    draft = exported[2]
    bad = tmp_path / "draft"
    shutil.copytree(draft, bad)
    (bad / "index.json").unlink()
    args = decode_args(exported, tmp_path / "o", "--model.init_args.draft", str(bad))
    assert "without an item index" in fails(args, capsys, "predict")
    shutil.copy(draft / "index.json", bad / "index.json")
    vocab = json.loads((bad / "tokenizer.json").read_text())
    vocab["added_tokens"][-1]["content"] = "<zz_0>"
    (bad / "tokenizer.json").write_text(json.dumps(vocab))
    assert "tokenizer" in fails(args, capsys, "predict")


def test_prompts_longer_than_the_targets_context_are_refused_before_decoding(exported, tmp_path, capsys) -> None:
    short = tmp_path / "short"
    shutil.copytree(exported[1], short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 8
    (short / "config.json").write_text(json.dumps(config))
    args = decode_args(exported, tmp_path / "o", "--model.init_args.target", str(short))
    assert "exceed the target's context of 8" in fails(args, capsys, "predict")
    assert not (tmp_path / "o" / "p.jsonl").exists()


def test_a_bad_atspeed_json_names_the_file_and_key(exported, tmp_path, capsys) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(exported[1], bad)
    meta = json.loads((bad / "atspeed.json").read_text())
    (bad / "atspeed.json").write_text(json.dumps(meta | {"levels": "two"}))
    err = fails(decode_args(exported, tmp_path / "o", "--model.init_args.target", str(bad)), capsys, "predict")
    assert f"{bad / 'atspeed.json'}: levels:" in err


def test_a_predictions_path_that_is_a_directory(exported, tmp_path, capsys) -> None:
    (tmp_path / "p.jsonl").mkdir()
    err = fails(decode_args(exported, tmp_path), capsys, "predict")
    assert "JsonlPredictionWriter.path" in err and "is a directory" in err


def test_a_second_predict_into_the_same_place_is_refused(exported, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.undo()  # this case decodes once for real
    main(["predict", *decode_args(exported, tmp_path, "--model.init_args.decoding.decoder", "beam")])
    first = (tmp_path / "p.jsonl").read_text()
    err = fails(decode_args(exported, tmp_path, "--model.init_args.decoding.decoder", "spec_strict"), capsys, "predict")
    assert "p.jsonl exists" in err and "overwrite" in err
    assert (tmp_path / "p.jsonl").read_text() == first


# -- export ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["user_directory", "run_directory", "parent_of_the_run", "a_file"])
def test_an_export_path_atspeed_did_not_write_is_refused_before_training(data, tmp_path, capsys, where) -> None:
    run = tmp_path / "run"
    target = (
        {"user_directory": tmp_path / "mine", "run_directory": run, "parent_of_the_run": tmp_path}[where]
        if where != "a_file"
        else tmp_path / "model.bin"
    )
    if where == "user_directory":
        target.mkdir()
        (target / "notes.txt").write_text("keep me")
    if where == "a_file":
        target.write_text("keep me")
    run.mkdir()
    (run / "earlier.log").write_text("keep me")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    err = fails(tiny_args(data, run, "--trainer.callbacks.init_args.dirpath", str(target)), capsys)
    assert "ExportHuggingFace.dirpath" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p in before} == before
    assert not (run / "checkpoints").exists(), "refused before training"


# -- teacher data ----------------------------------------------------------------------------------


def test_teacher_data_of_other_settings_is_refused(exported, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.undo()  # the first run decodes for real
    main(["predict", *teacher_args(exported, tmp_path)])
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}
    err = fails(teacher_args(exported, tmp_path, "--model.init_args.beams", "3"), capsys, "predict")
    assert "made by another target, item index or settings" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before


def test_teacher_data_needs_the_training_samples(exported, tmp_path, capsys) -> None:
    err = fails(teacher_args(exported, tmp_path, "--data.predict_set", "test"), capsys, "predict")
    assert "data.predict_set must be train" in err


# -- alignment -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.init_args.alpha", "1.5"], "model.init_args.alpha: Not of type ClosedUnitInterval"),
        (["--model.init_args.loss", "atspeed_x"], "'atspeed_s', 'atspeed_s_authors', 'atspeed_r', 'sft', 'word_kd'"),
        (["--model.init_args.ce_on", "prompt"], "'item', 'all'"),
        (["--model.init_args.loss_options.support_temperature", "0"], "support_temperature must be > 0"),
        (["--model.init_args.loss_options.temperature", "0"], "temperature"),
        (["--model.init_args.loss_options.top_k", "9"], "top_k"),
        (["--data.train_batches", "pairs"], "data.train_batches must be requests"),
    ],
)
def test_bad_alignment_settings(exported, teacher_data, tmp_path, capsys, extra, message) -> None:
    err = fails(align_args(exported, teacher_data, tmp_path / "run", *extra), capsys)
    assert message in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_teacher_data_of_another_target_or_none_is_refused(exported, teacher_data, tmp_path, capsys) -> None:
    other = ["--model.init_args.target", str(exported[2])]  # the draft export
    err = fails(align_args(exported, teacher_data, tmp_path / "run", *other), capsys)
    assert "made by another target, item index or settings" in err
    err = fails(align_args(exported, tmp_path / "nothing", tmp_path / "run"), capsys)
    assert "no teacher manifest" in err
    err = fails(align_args(exported, teacher_data, tmp_path / "run", "--data.train_samples", "last"), capsys)
    assert "teacher data covers 96 samples, training has 24" in err


# -- places that cannot be written or are in use, found before anything is built -------------------------------------

# root writes through permission bits, but no file can be made under /proc: a location that really refuses writes
READ_ONLY = Path("/proc/atspeed-test")
needs_proc = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")


def exits(entry, args: list[str], capsys) -> str:
    """``entry(args)`` (an entry point's main) expecting exit 2 with one ``error:`` line and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        entry(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    messages = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(messages) == 1 and "Traceback" not in err, err
    return messages[0]


@needs_proc
def test_an_export_location_that_cannot_be_written_is_refused_before_training(data, tmp_path, capsys) -> None:
    err = fails(
        tiny_args(data, tmp_path / "run", "--trainer.callbacks.init_args.dirpath", str(READ_ONLY / "hf")), capsys
    )
    assert "ExportHuggingFace.dirpath" in err and "not writable" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@needs_proc
def test_export_out_that_cannot_be_written(tmp_path, capsys) -> None:
    from atspeed.export_checkpoint import main as export_main

    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    err = exits(export_main, [str(ckpt), "--out", str(READ_ONLY / "hf")], capsys)
    assert "--out" in err and "not writable" in err


def _pipeline(tmp_path: Path, run: str, summary: Path | None = None) -> list[str]:
    content = {"stages": [{"name": "a", "run": run, "output": str(tmp_path / "a" / "hf")}]}
    if summary is not None:
        content["summary"] = str(summary)
    (tmp_path / "p.yaml").write_text(json.dumps(content))
    return [str(tmp_path / "p.yaml")]


@pytest.fixture
def no_stage_runs(monkeypatch) -> None:
    def refuse(stage):
        raise AssertionError(f"stage {stage.name} ran before the bad input was reported")

    monkeypatch.setattr("atspeed.pipeline.run_stage", refuse)


@pytest.mark.parametrize("where", ["directory", "read_only"])
def test_a_pipeline_summary_that_cannot_be_written_is_refused_before_the_first_stage(
    tmp_path, capsys, no_stage_runs, where
) -> None:
    from atspeed.pipeline import main as pipeline_main

    if where == "read_only" and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    summary = tmp_path / "summary" if where == "directory" else READ_ONLY / "summary.json"
    if where == "directory":
        summary.mkdir()
    err = exits(pipeline_main, _pipeline(tmp_path, "fit", summary), capsys)
    assert "p.yaml: summary" in err and str(summary if where == "directory" else READ_ONLY) in err


def test_a_pipeline_command_with_an_unclosed_quote(tmp_path, capsys, no_stage_runs) -> None:
    from atspeed.pipeline import main as pipeline_main

    err = exits(pipeline_main, _pipeline(tmp_path, "fit --config 'configs/tiny/target_sft.yaml"), capsys)
    assert "p.yaml: stages[0].run" in err and "No closing quotation" in err


def test_deepspeed_on_a_machine_without_a_gpu(data, tmp_path, capsys, monkeypatch) -> None:
    pytest.importorskip("deepspeed")
    from tests.integration.tiny_data import ROOT

    monkeypatch.chdir(ROOT)  # configs/deepspeed/zero2.yaml names its JSON relative to the repository root
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = fails([*tiny_args(data, tmp_path / "run"), "--config", "configs/deepspeed/zero2.yaml"], capsys)
    assert "DeepSpeed needs a CUDA GPU" in err and "leaving out the --config configs/deepspeed" in err


def test_a_run_directory_in_use_by_another_run(data, tmp_path, capsys) -> None:
    from tests.integration.lock_holder import held_by_another_process

    run = tmp_path / "run"
    with held_by_another_process(run / ".atspeed.lock") as pid:
        err = fails(tiny_args(data, run), capsys)
    assert f"trainer.default_root_dir: {run} is in use by another atspeed run (pid {pid}, host" in err
    assert sorted(p.name for p in run.iterdir()) == [".atspeed.lock"]  # nothing written
