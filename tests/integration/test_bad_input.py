"""Each bad input ends in one clear message naming the key, file or line, and leaves no output behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atspeed.cli import main
from atspeed.models.tokenizer import build_word_tokenizer
from tests.integration.tiny_data import tiny_args, write_processed


def fails(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def data(tmp_path) -> Path:
    return write_processed(tmp_path / "data")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (["--data.source", "csv"], "data.source"),
        (["--data.split", "random"], "data.split"),
        (["--data.batch_size", "-4"], "data.batch_size"),
        (["--data.max_history", "0"], "data.max_history"),
        (["--model.init_args.model.hidden_size", "-8"], "hidden_size"),
        (["--model.init_args.loss_on", "prompt"], "loss_on"),
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
    assert "data.path" in err and "absent" in err


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
    err = fails(tiny_args(data, tmp_path / "run", "--data.kcore", "50"), capsys)
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
    with pytest.raises(ValueError, match=r"model\.max_positions"):
        main(["fit", *tiny_args(data, tmp_path / "run", "--model.init_args.model.max_positions", "8")])
