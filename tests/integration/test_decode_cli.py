"""Decoding through the CLI: ``predict`` with each decoder on a tiny exported target and draft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atspeed.cli import main
from tests.integration.tiny_data import ROOT, tiny_args, write_processed

DECODE_CONFIG = str(ROOT / "configs/tiny/decode.yaml")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data dir, target export, draft export): two tiny SFT fits on the same data."""
    root = tmp_path_factory.mktemp("decode")
    data = write_processed(root / "data")
    main(["fit", *tiny_args(data, root / "target")])
    draft_sizes = ["--model.init_args.model.hidden_size", "8", "--model.init_args.model.num_layers", "1"]
    main(["fit", *tiny_args(data, root / "draft"), *draft_sizes])
    return data, root / "target" / "hf", root / "draft" / "hf"


def decode_args(exported, out: Path, *extra: str) -> list[str]:
    data, target, draft = exported
    callbacks = [
        {
            "class_path": "atspeed.callbacks.predictions.JsonlPredictionWriter",
            "init_args": {"path": str(out / "p.jsonl")},
        },
        {"class_path": "atspeed.callbacks.decode_report.DecodeReport", "init_args": {"path": str(out / "r.json")}},
        {"class_path": "atspeed.callbacks.decode_report.DecodeProgressBar"},
    ]
    return [
        "--config", DECODE_CONFIG,
        "--data.path", str(data),
        "--data.model_dir", str(target),
        "--model.init_args.target", str(target),
        "--model.init_args.draft", str(draft),
        "--trainer.default_root_dir", str(out),
        "--trainer.callbacks", json.dumps(callbacks),
        *extra,
    ]  # fmt: skip


def _run(exported, out: Path, decoder: str, *extra: str) -> tuple[list[dict], dict]:
    main(["predict", *decode_args(exported, out, "--model.init_args.decoder", decoder, *extra)])
    rows = [json.loads(line) for line in (out / "p.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "r.json").read_text())


def test_strict_speculative_predict_equals_beam_search_and_hf_generate(exported, tmp_path) -> None:
    beam_rows, beam_report = _run(exported, tmp_path / "beam", "beam")
    strict_rows, strict_report = _run(exported, tmp_path / "strict", "spec_strict")
    hf_rows, _ = _run(exported, tmp_path / "hf", "hf_beam")
    assert len(beam_rows) == 24 and all(len(r["items"]) == 3 for r in beam_rows)
    assert [r["items"] for r in strict_rows] == [r["items"] for r in beam_rows] == [r["items"] for r in hf_rows]
    assert strict_report["metrics"] == beam_report["metrics"]
    assert set(strict_report["metrics"]) == {"test/recall@1", "test/recall@3", "test/ndcg@1", "test/ndcg@3"}
    decode = strict_report["decode"]
    assert decode["lists"] == 24 and decode["target_calls_per_list"] >= 2
    assert sum(strict_report["accepted_histogram"]) >= 24  # one verification call per list at least
    assert beam_report["decode"]["target_calls_per_list"] == 2  # L = 2: prefill + one step


def test_relaxed_predict_is_reproducible_and_valid(exported, tmp_path) -> None:
    first, report = _run(exported, tmp_path / "a", "spec_relaxed", "--model.init_args.seed", "3")
    again, _ = _run(exported, tmp_path / "b", "spec_relaxed", "--model.init_args.seed", "3")
    assert first == again
    assert all(None not in r["items"] and len(set(r["items"])) == 3 for r in first)
    assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in first)
    assert 0.0 <= report["metrics"]["test/recall@3"] <= 1.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.init_args.draft_beams", "2"], "draft_beams"),
        (["--model.init_args.gamma", "0"], "gamma"),
        (["--model.init_args.eval_ks", "[5]"], "eval_ks"),
    ],
)
def test_bad_decode_settings_fail_before_loading(exported, tmp_path, capsys, extra, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *decode_args(exported, tmp_path, *extra)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_draft_with_another_tokenizer_or_no_index_is_refused(exported, tmp_path, capsys) -> None:
    import shutil

    draft = exported[2]
    bad = tmp_path / "draft"
    shutil.copytree(draft, bad)
    (bad / "index.json").unlink()
    with pytest.raises(SystemExit):
        main(["predict", *decode_args(exported, tmp_path / "o", "--model.init_args.draft", str(bad))])
    assert "without an item index" in capsys.readouterr().err
    shutil.copy(draft / "index.json", bad / "index.json")
    vocab = json.loads((bad / "tokenizer.json").read_text())
    vocab["added_tokens"][-1]["content"] = "<zz_0>"
    (bad / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(SystemExit):
        main(["predict", *decode_args(exported, tmp_path / "o", "--model.init_args.draft", str(bad))])
    assert "tokenizer" in capsys.readouterr().err


def test_prompts_longer_than_the_targets_context_are_refused_before_decoding(exported, tmp_path, capsys) -> None:
    import shutil

    short = tmp_path / "short"
    shutil.copytree(exported[1], short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 8
    (short / "config.json").write_text(json.dumps(config))
    args = decode_args(exported, tmp_path / "o", "--model.init_args.target", str(short), "--data.model_dir", str(short))
    with pytest.raises(SystemExit):
        main(["predict", *args])
    assert "exceed the target's context of 8" in capsys.readouterr().err
    assert not (tmp_path / "o" / "p.jsonl").exists()
