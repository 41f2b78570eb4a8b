"""Target SFT through the CLI, end to end on a tiny model: fit, export, validate/test/predict, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from atspeed.cli import main
from tests.integration.tiny_data import NUM_ITEMS, identifier, tiny_args, write_processed


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path]:
    """One tiny fit shared by the tests below: (data dir, run dir)."""
    root = tmp_path_factory.mktemp("sft")
    data = write_processed(root / "data")
    main(["fit", *tiny_args(data, root / "run")])
    return data, root / "run"


def _metrics(run: Path) -> list[dict[str, str]]:
    import csv

    (path,) = run.glob("logs/version_*/metrics.csv")
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_fit_logs_metrics_and_exports_a_loadable_model(fitted) -> None:
    _, run = fitted
    rows = _metrics(run)
    assert any(r.get("val/recall@3") for r in rows) and any(r.get("val/pop_recall@3") for r in rows)
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/loss") for r in rows)
    export = run / "hf"
    meta = json.loads((export / "atspeed.json").read_text())
    assert meta["levels"] == 2 and meta["global_step"] == 8
    index = json.loads((export / "index.json").read_text())
    assert index == {str(i): identifier(i) for i in range(NUM_ITEMS)}
    model = AutoModelForCausalLM.from_pretrained(export, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(export, local_files_only=True)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<b_3>") != tokenizer.unk_token_id
    assert not list(run.glob(".hf.*")), "no temporary export directory may be left behind"


def test_validate_test_and_predict_from_the_checkpoint(fitted, capsys) -> None:
    data, run = fitted
    ckpt = str(run / "checkpoints" / "last.ckpt")
    cli = main(["validate", *tiny_args(data, run), "--ckpt_path", ckpt])
    assert "val/recall@1" in cli.trainer.callback_metrics
    cli = main(["test", *tiny_args(data, run), "--ckpt_path", ckpt])
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= float(metrics["test/recall@3"]) <= 1.0
    out = run / "predictions.jsonl"
    writer = json.dumps(
        [{"class_path": "atspeed.callbacks.predictions.JsonlPredictionWriter", "init_args": {"path": str(out)}}]
    )
    main(["predict", *tiny_args(data, run), "--ckpt_path", ckpt, "--trainer.callbacks", writer])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 24  # every test user
    for row in rows:
        assert len(row["items"]) == 3 and len(set(row["items"])) == 3
        assert row["scores"] == sorted(row["scores"], reverse=True)
        assert len(row["targets"]) == 1


def test_a_fit_without_validation_says_so_instead_of_a_table_of_nan(tmp_path, caplog) -> None:
    data = write_processed(tmp_path / "data")
    with caplog.at_level("INFO"):
        main(["fit", *tiny_args(data, tmp_path / "run", "--trainer.max_steps", "2")])
    text = caplog.text
    assert "no validation ran during this fit" in text and "nan" not in text


def test_lora_fit_trains_adapters_and_new_token_rows_only(tmp_path) -> None:
    data = write_processed(tmp_path / "data")
    cli = main(tiny_args(data, tmp_path / "run", "--model.init_args.lora.r", "4"), run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    trainable = {n for n, p in cli.model.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    assert any("lm_head" in n for n in trainable) and any("embed_tokens" in n for n in trainable)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf", local_files_only=True)
    assert not any("lora" in n for n, _ in merged.named_parameters())
