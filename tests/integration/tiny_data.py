"""A small synthetic dataset in the authors' processed layout, with a learnable pattern (next = previous + 1)."""

from __future__ import annotations

import json
from pathlib import Path

NUM_ITEMS = 16
ROOT = Path(__file__).resolve().parents[2]


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
        "--data.path",
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
