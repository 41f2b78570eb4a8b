"""Every stage decodes with the trie on its model's device: the DataModule's trie is put on another device (meta,
which holds no data: using it there fails as a CPU trie fails with CUDA states) and each stage must move it, once,
instead of crashing. SFT validation, teacher data, alignment (training and validation) and predict."""

from __future__ import annotations

import json

import pytest
import torch

import atspeed.data.datamodule as datamodule
from atspeed.cli import main
from tests.integration.tiny_data import align_args, decode_args, teacher_args, tiny_args
from tests.unit.decoding_helpers import ElsewhereTrie

SHORT = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]


@pytest.fixture
def elsewhere(monkeypatch) -> list[ElsewhereTrie]:
    """Every trie the DataModule builds, put on the meta device; the list of them."""
    made: list[ElsewhereTrie] = []
    build = datamodule.PrefixTrie.build

    class Elsewhere:
        @staticmethod
        def build(*args, **kwargs) -> ElsewhereTrie:
            made.append(ElsewhereTrie.of(build(*args, **kwargs)))
            return made[-1]

    monkeypatch.setattr(datamodule, "PrefixTrie", Elsewhere)
    return made


def test_every_stage_moves_the_trie_to_its_device(exported, tmp_path, elsewhere) -> None:
    data = exported[0]
    sft = main(["fit", *tiny_args(data, tmp_path / "sft"), *SHORT, "--data.eval.val_users", "4"])
    assert 0.0 <= float(sft.trainer.callback_metrics["val/recall@3"]) <= 1.0
    main(["predict", *teacher_args(exported, tmp_path / "teacher")])
    assert (tmp_path / "teacher" / "data" / "manifest.json").is_file()
    align = main(["fit", *align_args(exported, tmp_path / "teacher" / "data", tmp_path / "align"), *SHORT])
    assert "val/mean_accepted_depth" in align.trainer.callback_metrics
    main(["predict", *decode_args(exported, tmp_path / "decode")])
    rows = [json.loads(line) for line in (tmp_path / "decode" / "p.jsonl").read_text().splitlines()]
    assert rows and all(len(row["items"]) == 3 for row in rows)
    assert len(elsewhere) == 4 and all(trie.moves == [torch.device("cpu")] for trie in elsewhere), "once per stage"
