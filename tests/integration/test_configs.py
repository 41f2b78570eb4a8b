"""Every shipped config parses (with the CLI's own parser), alone and merged with the logger add-ons."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from atspeed.cli import main, set_matmul_precision
from atspeed.pipeline import read_pipeline

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = sorted((ROOT / "configs").rglob("pipeline.yaml"))
ADD_ONS = ("loggers", "deepspeed", "sweeps")  # merged into a stage's config (deepspeed/, sweeps/: own tests)
DECODINGS = sorted((ROOT / "configs").rglob("decoding.yaml"))  # a dataset's one decoding: block (DecodeOptions)
STAGE_CONFIGS = sorted(
    p
    for p in (ROOT / "configs").rglob("*.yaml")
    if p.parent.name not in ADD_ONS and p not in PIPELINES and p not in DECODINGS
)
SHARED = ROOT.parent / "shared" / "data" / "amazon-beauty"


@pytest.mark.parametrize("config", STAGE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses(config: Path, tmp_path, monkeypatch) -> None:
    if ("beauty" in config.parts or "llama7b" in config.parts) and not SHARED.is_dir():
        pytest.skip("needs ../shared/data/amazon-beauty")
    monkeypatch.chdir(ROOT)
    data = tmp_path / "data"
    args = ["--config", str(config), "--config", str(ROOT / "configs/loggers/wandb.yaml")]
    args += ["--trainer.default_root_dir", str(tmp_path / "run")]  # not the config's own (a real run may hold it)
    if "tiny" in config.parts and "ProcessedOptions" in config.read_text():  # (qwen2.yaml, an add-on, has no data)
        from tests.integration.tiny_data import write_processed

        args += ["--data.source.init_args.path", str(write_processed(data))]
    if config.name in ("decode.yaml", "teacher.yaml", "align.yaml"):  # these name exported models: a stand-in
        export = str(_fake_export(tmp_path / "export"))
        args += ["--model.init_args.target", export]
        if config.name == "decode.yaml":
            args += ["--model.init_args.draft", export]
    if "llama7b" in config.parts and config.name.endswith("_sft.yaml"):  # a local checkpoint: real format, tiny
        from tests.integration.tiny_data import tiny_hf_checkpoint

        checkpoint = str(tiny_hf_checkpoint(tmp_path / "llama"))
        args += ["--model.init_args.model.path", checkpoint, "--data.tokenizer", checkpoint]
    cli = main(args, run=False)
    assert cli.model is not None and cli.datamodule is not None
    assert type(cli.trainer.logger).__name__ == "WandbLogger"


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pipeline_names_shipped_configs(pipeline: Path, monkeypatch) -> None:
    """Every stage of a shipped pipeline is a CLI command over shipped configs; stages that decode come last."""
    monkeypatch.chdir(ROOT)
    stages = read_pipeline(pipeline).stages
    for stage in stages:
        configs = [stage.argv[i + 1] for i, arg in enumerate(stage.argv) if arg == "--config"]
        assert configs and all(Path(c).is_file() for c in configs), stage.name
    decoders = [s.name for s in stages if "decode.yaml" in " ".join(s.argv)]
    assert decoders == [s.name for s in stages[-len(decoders) :]] and len(decoders) >= 4  # HF, beam, one per draft


@pytest.mark.parametrize("decoding", DECODINGS, ids=lambda p: p.parent.name)
def test_align_validates_with_the_decoding_that_decode_uses(decoding: Path, monkeypatch, tmp_path) -> None:
    """A dataset's align.yaml and decode.yaml both read its decoding.yaml: validation measures the K, N and gamma
    the predict stage decodes with."""
    from atspeed.cli import parse_command
    from atspeed.decoding.options import DecodeOptions

    monkeypatch.chdir(ROOT.parent)  # the file is found beside the config, wherever the command runs
    blocks = []
    for subcommand, name in (("fit", "align.yaml"), ("predict", "decode.yaml")):
        assert "decoding: decoding.yaml" in (decoding.parent / name).read_text(), name
        data = ["--data.source.init_args.path", str(tmp_path)] if decoding.parent.name == "tiny" else []  # the caller's
        block = parse_command([subcommand, "--config", str(decoding.parent / name), *data]).model.init_args.decoding
        blocks.append(DecodeOptions(**{k: v for k, v in vars(block).items() if not k.startswith("__")}))
    assert blocks[0] == blocks[1]


def _fake_export(root: Path) -> Path:
    """An export directory as ExportHuggingFace writes it (config, tokenizer, index, atspeed.json), untrained."""
    import json

    from transformers import LlamaConfig

    from atspeed.models.tokenizer import build_word_tokenizer

    tokens = ["<a_0>", "<b_0>"]
    root.mkdir(parents=True)
    build_word_tokenizer(["History: {history}. Next:"], tokens).save_pretrained(root)
    LlamaConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(root)
    (root / "index.json").write_text(json.dumps({"0": tokens}))
    meta = {"prompt": "History: {history}. Next:", "max_history": 5, "levels": 2, "constraint": "exact"}
    (root / "atspeed.json").write_text(json.dumps(meta))
    return root


def test_print_config_merges_configs_and_dotted_overrides(capsys) -> None:
    args = ["fit", "--config", str(ROOT / "configs/quickstart/target_sft.yaml")]
    args += ["--config", str(ROOT / "configs/loggers/wandb.yaml"), "--data.max_history", "7", "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "max_history: 7" in out and "WandbLogger" in out and "every_n_train_steps: 200" in out


@pytest.mark.parametrize(
    ("accelerator", "cuda", "expected"),
    [("auto", True, "high"), ("gpu", True, "high"), ("cuda", True, "high"), ("cpu", True, "highest"),
     ("auto", False, "highest")],
)  # fmt: skip
def test_matmul_precision_is_set_for_cuda_runs_only(monkeypatch, accelerator: str, cuda: bool, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        assert set_matmul_precision("high", accelerator) == (expected == "high")
        assert torch.get_float32_matmul_precision() == expected
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_cli_sets_matmul_precision_before_building(tmp_path, monkeypatch) -> None:
    from tests.integration.tiny_data import tiny_args, write_processed

    calls = []
    monkeypatch.setattr("atspeed.cli.set_matmul_precision", lambda *args: calls.append(args))
    args = tiny_args(write_processed(tmp_path / "data"), tmp_path / "run", "--matmul_precision", "medium")
    cli = main(args, run=False)
    assert calls == [("medium", "cpu")] and cli.model.model is None  # before the model is built
