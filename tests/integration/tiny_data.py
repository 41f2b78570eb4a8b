"""A small synthetic dataset in the authors' processed layout, with a learnable pattern (next = previous + 1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

NUM_ITEMS = 16
ROOT = Path(__file__).resolve().parents[2]
DECODE_CONFIG = str(ROOT / "configs/tiny/decode.yaml")
TEACHER_CONFIG = str(ROOT / "configs/tiny/teacher.yaml")


def identifier(item: int) -> list[str]:
    return [f"<a_{item // 4}>", f"<b_{item % 4}>"]


def write_processed(root: Path, num_users: int = 24, length: int = 7) -> Path:
    """sequential_{train,valid,test}.txt (train = first length-2 items, then one valid and one test) + index."""
    root.mkdir(parents=True, exist_ok=True)
    lines = {"train": [], "valid": [], "test": []}
    for user in range(num_users):
        seq = [(user + step) % NUM_ITEMS for step in range(length)]
        lines["train"].append(" ".join(map(str, [user, *seq[:-2]])))
        lines["valid"].append(f"{user} {seq[-2]}")
        lines["test"].append(f"{user} {seq[-1]}")
    for part, rows in lines.items():
        (root / f"sequential_{part}.txt").write_text("\n".join(rows) + "\n")
    (root / "tiny.index.json").write_text(json.dumps({str(i): identifier(i) for i in range(NUM_ITEMS)}))
    return root


def tiny_args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """CLI arguments for configs/tiny/target_sft.yaml on ``data_dir``, writing everything under ``run_dir``."""
    return [
        "--config",
        str(ROOT / "configs/tiny/target_sft.yaml"),
        "--data.source.init_args.path",
        str(data_dir),
        "--data.cache_dir",
        str(run_dir / "cache"),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.logger.init_args.save_dir",
        str(run_dir),
        "--trainer.callbacks.init_args.dirpath",
        str(run_dir / "hf"),
        *extra,
    ]


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
        "--data.source.init_args.path", str(data),
        "--model.init_args.target", str(target),
        "--model.init_args.draft", str(draft),
        "--trainer.default_root_dir", str(out),
        "--trainer.callbacks", json.dumps(callbacks),
        *extra,
    ]  # fmt: skip


def load_script(name: str):
    """``scripts/<name>.py`` as a module (the scripts are not a package), for calling its ``main`` in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(subcommand: str, args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m atspeed <subcommand> <args>`` in a fresh process (W&B offline; tests' helpers importable)."""
    return subprocess.run(
        [sys.executable, "-m", "atspeed", subcommand, *args], cwd=cwd, env=_cli_env(), capture_output=True, text=True,
        timeout=300, preexec_fn=_default_sigint,
    )  # fmt: skip


def start_cli(subcommand: str, args: list[str], cwd: Path = ROOT) -> subprocess.Popen:
    """``run_cli`` started in the background: the caller waits for it (``communicate``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "atspeed", subcommand, *args], cwd=cwd, env=_cli_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
    )  # fmt: skip


def _cli_env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}


def _default_sigint() -> None:
    """The child starts with Ctrl-C enabled, whatever this process inherited or set (a shell's background job
    ignores SIGINT; Lightning ignores it for good after a KeyboardInterrupt), so Python raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def teacher_args(exported, out: Path, *extra: str) -> list[str]:
    data, target, _ = exported
    return [
        "--config", TEACHER_CONFIG,
        "--data.source.init_args.path", str(data),
        "--model.init_args.target", str(target),
        "--trainer.default_root_dir", str(out),
        "--trainer.callbacks.init_args.dirpath", str(out / "data"),
        *extra,
    ]  # fmt: skip


ALIGN_CONFIG = str(ROOT / "configs/tiny/align.yaml")


def align_args(exported, teacher_dir: Path, out: Path, *extra: str) -> list[str]:
    """CLI arguments for configs/tiny/align.yaml: a draft aligned to the exported tiny target, under ``out``."""
    data, target, _ = exported
    return [
        "--config", ALIGN_CONFIG,
        "--data.source.init_args.path", str(data),
        "--model.init_args.target", str(target),
        "--model.init_args.teacher_dir", str(teacher_dir),
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.callbacks.init_args.dirpath", str(out / "hf"),
        *extra,
    ]  # fmt: skip


def tiny_hf_checkpoint(root: Path) -> Path:
    """A tiny Llama and its word-level tokenizer saved with ``save_pretrained``: the real on-disk format of a local
    Hugging Face checkpoint (config.json, safetensors weights, tokenizer files), for configs that name one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from atspeed.data.prompts import PAPER_PROMPT
    from atspeed.models.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer([PAPER_PROMPT.format(history="")], [])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root
