"""The data module's sources and the settings it takes from a model export: a new source is one options class, one
loader and one row; an export's prompt or max_history is never silently put in place of the user's."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from atspeed.cli import main
from atspeed.data.datamodule import RecDataModule
from atspeed.data.schema import Interactions
from atspeed.data.sources import SOURCES, Source, SourceOptions, source_name
from tests.integration.test_bad_input import fails
from tests.integration.tiny_data import NUM_ITEMS, decode_args, tiny_args, write_processed

TINY_PROMPT = "History: {history}. Next:"  # configs/tiny/target_sft.yaml, with max_history 5


@dataclass(frozen=True, kw_only=True)
class CountingOptions(SourceOptions):
    """A made-up source: ``users`` users, each walking through the items in order from a different start."""

    users: int = 12
    kcore: int = 0


def load_counting(options: CountingOptions) -> Interactions:
    sequences = [[(user + step) % NUM_ITEMS for step in range(6)] for user in range(options.users)]
    return Interactions(
        name="counting",
        user_ids=[str(u) for u in range(options.users)],
        item_ids=[str(i) for i in range(NUM_ITEMS)],
        sequences=sequences,
        timestamps=[[float(t) for t in range(6)] for _ in sequences],
    )


def test_a_new_source_is_one_options_class_one_loader_and_one_row(tmp_path, monkeypatch) -> None:
    index = write_processed(tmp_path / "data") / "tiny.index.json"
    monkeypatch.setitem(SOURCES, "counting", Source(CountingOptions, load_counting))
    dm = RecDataModule(source=CountingOptions(users=10), index_file=str(index), split="leave_one_out", max_history=3)
    dm.setup("fit")
    assert source_name(dm.hparams.source) == "counting"
    assert dm.prepared.data.name == "counting" and len(dm.prepared.split.test) == 10


def test_the_source_is_chosen_by_class_path_with_its_own_keys(tmp_path, capsys) -> None:
    data = write_processed(tmp_path / "data")
    cli = main(tiny_args(data, tmp_path / "run", "--data.source.init_args.name", "toy"), run=False)
    assert cli.datamodule.hparams.source.name == "toy" and Path(cli.datamodule.hparams.source.path) == data
    err = fails(tiny_args(data, tmp_path / "run", "--data.source.init_args.min_rating", "4"), capsys)
    assert err == "error: data.source: Option 'min_rating' is not accepted"  # processed data has no ratings


def test_the_export_settings_left_unset_are_taken_with_one_logged_line(exported, tmp_path, capsys) -> None:
    target = exported[1]
    capsys.readouterr()
    cli = main(decode_args(exported, tmp_path / "run"), run=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if "from the model at" in line]
    taken = f"prompt={TINY_PROMPT!r}, max_history=5"  # constraint: exact, the default, so not named
    assert lines == [f"[atspeed] data: {taken}, from the model at {target} (atspeed.json)"]
    hp = cli.datamodule.hparams
    assert (hp.prompt, hp.max_history, hp.constraint) == (TINY_PROMPT, 5, "exact")
    assert json.loads((target / "atspeed.json").read_text())["prompt"] == TINY_PROMPT
    # set to the export's own values: accepted, nothing to report
    main(decode_args(exported, tmp_path / "same", "--data.prompt", TINY_PROMPT, "--data.max_history", "5"), run=False)
    assert "from the model at" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (["--data.prompt", "Seen: {history}. Next:"], "data.prompt"),
        (["--data.max_history", "3"], "data.max_history"),
        (["--data.constraint", "per_position"], "data.constraint"),
        (["--data.index_file", "tiny.index.json"], "data.index_file"),
    ],
)
def test_export_settings_set_otherwise_are_an_error_naming_the_key(exported, tmp_path, capsys, override, key) -> None:
    args = decode_args(exported, tmp_path / "run", *override)
    if key == "data.index_file":
        args[-1] = str(exported[0] / "tiny.index.json")
    err = fails(args, capsys, "predict")
    assert err.startswith(f"error: {key}: ") and f"what the model at {exported[1]} was trained with" in err
