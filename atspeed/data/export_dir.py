"""The directory the SFT stage exports (``ExportHuggingFace``) and the decoding stage reads.

``save_pretrained`` weights and config, the tokenizer, ``index.json`` (item id -> identifier tokens, the index the
model was trained with) and ``atspeed.json`` (``ExportMeta``: prompt, max_history, levels, constraint, dataset, split,
step).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt
from transformers import AutoTokenizer

from atspeed.atomic import write_text_atomic
from atspeed.data.json_file import read_json, validated
from atspeed.errors import DataError
from atspeed.preflight import check_model_weights

INDEX_FILE = "index.json"
META_FILE = "atspeed.json"


class ExportMeta(BaseModel):
    """``atspeed.json``: how the exported model was trained to be asked, and which export it is. ``save`` and ``load``
    are its one writer and one reader (as ``PretrainedConfig.save_pretrained`` / ``from_pretrained``); keys it does
    not know are ignored, so an export keeps loading when later versions add keys."""

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    prompt: str
    """Prompt template (one ``{history}`` field) the model was trained with."""
    max_history: PositiveInt
    """Most recent items shown in the prompt."""
    levels: PositiveInt
    """Identifier tokens per item."""
    constraint: Literal["exact", "per_position"]
    """Decoding constraint of the training data."""
    dataset: str | None = None
    split: str | None = None
    global_step: NonNegativeInt | None = None
    """Optimizer steps of the exported weights."""
    export_id: str | None = None
    """Tells two exports apart (teacher data names the one it came from)."""

    def save(self, dirpath: str | Path) -> None:
        """Write ``dirpath/atspeed.json`` (atomically)."""
        write_text_atomic(Path(dirpath) / META_FILE, json.dumps(self.model_dump(), indent=2))

    @classmethod
    def load(cls, model_dir: str | Path) -> ExportMeta:
        """The metadata of an exported model directory, after checking the directory is complete and its pickled
        weights, if any, hold tensors only; a bad ``atspeed.json`` ends in one DataError naming the file and key."""
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
        meta = validated(cls, read_json(path, META_FILE), path)
        check_model_weights(root)
        return meta


def check_same_identifiers(target: str, draft: str, key: str = "model.draft") -> None:
    """The draft export must share the target's tokenizer vocabulary and item index (``key`` names the setting)."""
    ExportMeta.load(draft)
    if (Path(target) / INDEX_FILE).read_text() != (Path(draft) / INDEX_FILE).read_text():
        raise DataError(f"{key}: {draft}/{INDEX_FILE} differs from the target's: different identifiers")
    vocabs = [
        AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False).get_vocab()
        for path in (target, draft)
    ]
    if vocabs[0] != vocabs[1]:
        raise DataError(f"{key}: the tokenizer of {draft} differs from the target's ({target})")
