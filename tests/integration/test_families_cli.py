"""Model families through the CLI: a tiny Qwen2 target and draft (``configs/tiny/qwen2.yaml``) fit, export and decode
with strict speculative lists equal to beam search's and Hugging Face generate's; a sliding-window checkpoint is
refused in one line before any model is built; the quick start's SFT stages take the same add-on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import Qwen2Config

from atspeed.cli import main
from tests.integration.test_bad_input import fails
from tests.integration.tiny_data import ROOT, decode_args, tiny_args, tiny_hf_checkpoint, write_processed

QWEN2 = str(ROOT / "configs/tiny/qwen2.yaml")


def _decode(exported, out: Path, decoder: str) -> list[list]:
    main(["predict", *decode_args(exported, out, "--model.init_args.decoding.decoder", decoder)])
    return [json.loads(line)["items"] for line in (out / "p.jsonl").read_text().splitlines()]


def test_a_tiny_qwen2_target_and_draft_fit_export_and_decode_strict_lists_equal_to_beam_search(tmp_path) -> None:
    data = write_processed(tmp_path / "data")
    short = ["--config", QWEN2, "--trainer.max_steps", "4"]  # strict = beam holds for any weights: one validation
    main(["fit", *tiny_args(data, tmp_path / "target", *short)])
    draft_sizes = ["--model.init_args.model.hidden_size", "8", "--model.init_args.model.num_layers", "1"]
    main(["fit", *tiny_args(data, tmp_path / "draft", *short, *draft_sizes)])
    exported = (data, tmp_path / "target" / "hf", tmp_path / "draft" / "hf")
    for model_dir in exported[1:]:
        config = json.loads((model_dir / "config.json").read_text())
        assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"], config
    assert json.loads((exported[2] / "config.json").read_text())["hidden_size"] == 8
    beam = _decode(exported, tmp_path / "beam", "beam")
    strict = _decode(exported, tmp_path / "strict", "spec_strict")
    hf = _decode(exported, tmp_path / "hf", "hf_beam")
    assert len(beam) == 24 and all(len(items) == 3 and None not in items for items in beam)
    assert strict == beam == hf


def test_a_sliding_window_checkpoint_is_refused_before_any_model_is_built(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("atspeed.modules.sft.build_causal_lm", lambda *a, **k: pytest.fail("a model was built"))
    checkpoint = tiny_hf_checkpoint(tmp_path / "ckpt")  # a real checkpoint's files, its config made a sliding Qwen2
    sizes = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    Qwen2Config(**sizes, use_sliding_window=True, sliding_window=8, max_window_layers=0).save_pretrained(checkpoint)
    data = write_processed(tmp_path / "data")
    err = fails(tiny_args(data, tmp_path / "run", "--model.init_args.model.path", str(checkpoint)), capsys)
    assert "model.path" in err and "sliding-window" in err, err


def test_the_quickstart_sft_stages_become_qwen2_with_the_add_on(monkeypatch) -> None:
    """configs/quickstart/pipeline.yaml with ``--config configs/tiny/qwen2.yaml`` appended to its target and draft
    stages: both build a Qwen2 of their own sizes (parsed and instantiated, not run)."""
    monkeypatch.chdir(ROOT)
    target = ["--config", "configs/quickstart/target_sft.yaml"]
    for stage, hidden in ((target, 128), ([*target, "--config", "configs/quickstart/draft_sft.yaml"], 16)):
        cli = main([*stage, "--config", QWEN2], run=False)
        assert (cli.model.spec.family, cli.model.spec.hidden_size) == ("qwen2", hidden)
