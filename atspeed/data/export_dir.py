"""The directory the SFT stage exports (``ExportHuggingFace``) and the decoding stage reads.

``save_pretrained`` weights and config, the tokenizer, ``index.json`` (item id -> identifier tokens, the index the
model was trained with) and ``atspeed.json`` (prompt, max_history, levels, constraint, dataset, split, step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from atspeed.data.json_file import read_json
from atspeed.errors import DataError
from atspeed.preflight import check_model_weights

INDEX_FILE = "index.json"
META_FILE = "atspeed.json"
REQUIRED_META = ("prompt", "max_history", "levels", "constraint")


def read_export(model_dir: str | Path) -> dict[str, Any]:
    """``atspeed.json`` of an exported model directory, after checking the directory is complete and its pickled
    weights, if any, hold tensors only."""
    root = Path(model_dir)
    if not root.is_dir():
        raise DataError(f"{root}: model directory not found")
    if not (root / "config.json").is_file():
        raise DataError(f"{root}: no config.json: not a Hugging Face model directory")
    if not (root / INDEX_FILE).is_file():
        raise DataError(
            f"{root}: checkpoint without an item index ({INDEX_FILE}); export models with "
            "atspeed.callbacks.export.ExportHuggingFace so the identifiers travel with the weights"
        )
    path = root / META_FILE
    if not path.is_file():
        raise DataError(f"{root}: no {META_FILE} (prompt and identifier settings of the export)")
    meta = read_json(path, META_FILE)
    missing = [key for key in REQUIRED_META if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}")
    check_model_weights(root)
    return meta


def check_same_identifiers(target: str, draft: str, key: str = "model.draft") -> None:
    """The draft export must share the target's tokenizer vocabulary and item index (``key`` names the setting)."""
    read_export(draft)
    if (Path(target) / INDEX_FILE).read_text() != (Path(draft) / INDEX_FILE).read_text():
        raise DataError(f"{key}: {draft}/{INDEX_FILE} differs from the target's: different identifiers")
    vocabs = [
        AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False).get_vocab()
        for path in (target, draft)
    ]
    if vocabs[0] != vocabs[1]:
        raise DataError(f"{key}: the tokenizer of {draft} differs from the target's ({target})")
