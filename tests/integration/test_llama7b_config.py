"""configs/llama7b: the paper's LoRA SFT settings fit a local checkpoint in the real Hugging Face format (tiny here)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from atspeed.cli import main
from tests.integration.tiny_data import ROOT, tiny_hf_checkpoint, write_processed


@pytest.mark.slow
def test_the_7b_config_fits_lora_on_a_local_checkpoint(tmp_path) -> None:
    """Two optimizer steps of configs/llama7b/target_sft.yaml on a tiny saved Llama and tiny data: LoRA r = 8, alpha
    16 on q/v only, plus the new identifier tokens' rows, train; the export merges the adapters."""
    checkpoint = str(tiny_hf_checkpoint(tmp_path / "llama"))
    data = write_processed(tmp_path / "data")
    run = tmp_path / "run"
    args = [
        "fit", "--config", str(ROOT / "configs/llama7b/target_sft.yaml"),
        "--model.init_args.model.path", checkpoint, "--data.tokenizer", checkpoint,
        "--model.init_args.model.dtype", "float32", "--trainer.precision", "32-true", "--trainer.accelerator", "cpu",
        "--data.path", str(data), "--data.index_file", str(data / "tiny.index.json"), "--data.index_key_offset", "0",
        "--data.cache_dir", str(run / "cache"), "--data.eval.val_users", "4", "--model.init_args.eval_ks", "[1, 3]",
        "--trainer.max_steps", "2", "--trainer.accumulate_grad_batches", "1", "--trainer.val_check_interval", "2",
        "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
        "--trainer.callbacks.init_args.dirpath", str(run / "hf"), "--data.max_history", "5",
    ]  # fmt: skip
    cli = main(args[1:], run=False)
    lora = cli.model.lora
    assert (lora.r, lora.alpha, lora.target_modules, cli.model.hparams.lr) == (8, 16, ["q_proj", "v_proj"], 1e-4)
    main(args)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2
    trained = {k for k in state["state_dict"] if "lora_" in k}
    assert trained and all(("q_proj" in k or "v_proj" in k) for k in trained)
    assert json.loads((run / "hf" / "atspeed.json").read_text())["global_step"] == 2
    exported = [key for path in (run / "hf").glob("*.safetensors") for key in load_file(path)]
    assert exported and not any("lora" in key for key in exported)  # the adapters are merged into the weights
