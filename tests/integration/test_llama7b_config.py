"""configs/llama7b: the paper's settings from local checkpoints in the real Hugging Face format (tiny here): LoRA
SFT of the target, SFT of its 68M-class draft with the target's tokenizer, teacher data in bf16, and alignment with
the frozen target loaded in bf16 outside the trained module."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from atspeed.cli import main, parse_command
from tests.integration.tiny_data import ROOT, tiny_hf_checkpoint, write_processed

CONFIGS = ROOT / "configs/llama7b"
CPU = ["--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--trainer.log_every_n_steps", "1"]


def _paths(run: Path) -> list[str]:
    return ["--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
            "--trainer.callbacks.init_args.dirpath", str(run / "hf")]  # fmt: skip


def _data(data: Path) -> list[str]:
    """The tiny data (its index keys are the item ids, no offset)."""
    return ["--data.source.init_args.path", str(data), "--data.index_key_offset", "0"]


def _sft_args(config: str, checkpoint: str, tokenizer: str, data: Path, run: Path) -> list[str]:
    return [
        "fit", "--config", str(CONFIGS / config),
        "--model.init_args.model.path", checkpoint, "--data.tokenizer", tokenizer,
        "--model.init_args.model.dtype", "float32", *CPU,
        "--data.source.init_args.path", str(data), "--data.index_file", str(data / "tiny.index.json"),
        "--data.index_key_offset", "0",
        "--data.cache_dir", str(run / "cache"), "--data.eval.val_users", "4", "--model.init_args.eval_ks", "[1, 3]",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--data.max_history", "5", *_paths(run),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama7b")
    return {"target_ckpt": tiny_hf_checkpoint(root / "llama-7b"), "draft_ckpt": tiny_hf_checkpoint(root / "llama-68m"),
            "data": write_processed(root / "data"), "root": root}  # fmt: skip


@pytest.fixture(scope="module")
def target_args(world) -> list[str]:
    ckpt = str(world["target_ckpt"])
    args = _sft_args("target_sft.yaml", ckpt, ckpt, world["data"], world["root"] / "target")
    return [*args, "--trainer.accumulate_grad_batches", "1"]


@pytest.mark.slow
def test_the_7b_config_fits_lora_on_a_local_checkpoint(world, target_args) -> None:
    """Two optimizer steps of configs/llama7b/target_sft.yaml on a tiny saved Llama and tiny data: LoRA r = 8, alpha
    16 on q/v only, plus the new identifier tokens' rows, train; the export merges the adapters."""
    run = world["root"] / "target"
    cli = main(target_args[1:], run=False)
    lora = cli.model.lora
    assert (lora.r, lora.alpha, lora.target_modules, cli.model.hparams.lr) == (8, 16, ["q_proj", "v_proj"], 1e-4)
    main(target_args)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2
    trained = {k for k in state["state_dict"] if "lora_" in k}
    assert trained and all(("q_proj" in k or "v_proj" in k) for k in trained)
    assert json.loads((run / "hf" / "atspeed.json").read_text())["global_step"] == 2
    exported = [key for path in (run / "hf").glob("*.safetensors") for key in load_file(path)]
    assert exported and not any("lora" in key for key in exported)  # the adapters are merged into the weights


@pytest.mark.slow
def test_the_68m_draft_teacher_and_alignment_configs_chain_on_the_7b_target(world, target_args) -> None:
    root, data = world["root"], world["data"]
    target = root / "target" / "hf"
    if not target.is_dir():
        main(target_args)
    # the draft: its own checkpoint, the target's tokenizer (identifier tokens added the same way)
    main(_sft_args("draft_sft.yaml", str(world["draft_ckpt"]), str(world["target_ckpt"]), data, root / "draft"))
    for name in ("index.json", "tokenizer.json"):
        assert (root / "draft/hf" / name).read_text() == (target / name).read_text()
    teacher = root / "teacher"
    main(["predict", "--config", str(CONFIGS / "teacher.yaml"), *_data(data), "--trainer.accelerator",
          "cpu", "--model.init_args.target", str(target), "--trainer.default_root_dir", str(teacher),
          "--trainer.callbacks.init_args.dirpath", str(teacher / "data"), "--model.init_args.beams", "3"])  # fmt: skip
    manifest = json.loads((teacher / "data" / "manifest.json").read_text())
    assert manifest["fingerprint"]["settings"]["dtype"] == "bfloat16"
    align = root / "align"
    args = ["fit", "--config", str(CONFIGS / "align.yaml"), *_data(data), *CPU, *_paths(align),
            "--model.init_args.target", str(target), "--model.init_args.teacher_dir", str(teacher / "data"),
            "--model.init_args.draft_init", str(root / "draft/hf"), "--model.init_args.decoding.num_beams", "3",
            "--model.init_args.decoding.draft_beams", "6", "--model.init_args.loss_options", '{"top_k": 3}',
            "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--data.eval.val_users", "4"]  # fmt: skip
    cli = main(args)
    model = cli.model
    assert model.frozen.model.dtype == torch.bfloat16 and not any(
        p.requires_grad for p in model.frozen.model.parameters()
    )
    trained = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert trained == {id(p) for p in model.draft.parameters()}  # the optimizer holds the draft, all of it
    state = torch.load(align / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2 and all(key.startswith("draft.") for key in state["state_dict"])
    (log,) = align.glob("logs/version_*/metrics.csv")
    rows = list(csv.DictReader(log.read_text().splitlines()))
    assert any(row.get("val/mean_accepted_depth") for row in rows)


def test_the_decode_config_stops_in_one_line_until_the_exports_exist(tmp_path, monkeypatch, capsys) -> None:
    """configs/llama7b/decode.yaml names the earlier stages' exports: before they exist, one line and exit 2."""
    monkeypatch.chdir(tmp_path)
    config = parse_command(["predict", "--config", str(CONFIGS / "decode.yaml")])
    decoding = config.model.init_args.decoding
    settings = {k: decoding[k] for k in ("num_beams", "draft_beams", "gamma", "budget")} | {
        "dtype": config.model.init_args.dtype
    }
    assert settings == {"num_beams": 20, "draft_beams": 40, "gamma": 3, "budget": "auto", "dtype": "bfloat16"}
    assert config.matmul_precision == "high"
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["predict", "--config", str(CONFIGS / "decode.yaml")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: runs/llama7b/target/hf: model directory not found"
    ]


def test_the_decode_config_decodes_in_bf16_on_tiny_exports(exported, tmp_path) -> None:
    """The 7B decode config on the tiny exports (K, N made small): both models in bf16, budget auto, the speed
    ratio over beam search measured in the run."""
    data, target, draft = exported
    out = tmp_path / "decode"
    cli = main(["predict", "--config", str(CONFIGS / "decode.yaml"), *_data(data), "--trainer.accelerator", "cpu",
                "--model.init_args.target", str(target), "--model.init_args.draft", str(draft),
                "--model.init_args.decoding.num_beams", "3", "--model.init_args.decoding.draft_beams", "6",
                "--model.init_args.eval_ks", "[1, 3]", "--trainer.default_root_dir", str(out)])  # fmt: skip
    assert cli.model.target_model.dtype == cli.model.draft_model.dtype == torch.bfloat16
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["budget"] == "auto" and report["speed"]["ratio_over_beam"] > 0
