"""Get the item index for a dataset: read an index JSON, or build semantic ids and cache them as one."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from atspeed.data.index_file import read_index, write_index
from atspeed.data.schema import Interactions
from atspeed.errors import DataError
from atspeed.items.index import ItemIndex

log = logging.getLogger(__name__)

# Part of the cache key: bump when the way identifiers are built changes, so stale caches are not reused.
BUILDER_VERSION = "residual-kmeans-normalized-2"


@dataclass
class SemanticIdSpec:
    """How to build item identifiers when no index file is given (residual k-means of content embeddings)."""

    levels: int = 4
    """Identifier length L (code tokens per item)."""
    codebook_size: int = 256
    """Codes per level (at most 256 in the paper's setting)."""
    embeddings_file: str | None = None
    """Item embeddings [num_items, D] (.npy or .pt) in item order; default: embed item text with all-MiniLM-L6-v2."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.levels < 1:
            raise ValueError(f"data.semantic_ids.levels must be >= 1, got {self.levels}")
        if self.codebook_size < 2:
            raise ValueError(f"data.semantic_ids.codebook_size must be >= 2, got {self.codebook_size}")
        if self.embeddings_file is not None and not Path(self.embeddings_file).is_file():
            raise ValueError(f"data.semantic_ids.embeddings_file: file not found: {self.embeddings_file}")


def cached_index_path(data: Interactions, spec: SemanticIdSpec, cache_dir: str | Path) -> Path:
    """Where the index built for ``data`` under ``spec`` is cached (keyed by items and spec)."""
    key = hashlib.sha1("\n".join([*data.item_ids, repr(spec), BUILDER_VERSION]).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{data.name}-L{spec.levels}-C{spec.codebook_size}-{key}.index.json"


def build_index(data: Interactions, spec: SemanticIdSpec, cache_dir: str | Path) -> Path:
    """Build semantic ids for every item of ``data`` (unless cached) and return the index file."""
    path = cached_index_path(data, spec, cache_dir)
    if path.is_file():
        return path
    # Imported here: the embedding model (transformers) is only needed when an index is built.
    from atspeed.data.item_text import embed_texts, load_embeddings
    from atspeed.items.semantic_ids import codes_to_tokens, residual_kmeans, resolve_collisions

    if spec.embeddings_file is not None:
        emb = load_embeddings(spec.embeddings_file, len(data.item_ids))
    elif data.item_text is not None and any(data.item_text):
        emb = embed_texts(data.item_text)
    else:
        raise DataError(
            f"dataset {data.name} has no item text to embed: set data.index_file or data.semantic_ids.embeddings_file"
        )
    codes = residual_kmeans(emb, levels=spec.levels, codebook_size=spec.codebook_size, seed=spec.seed)
    unique, moved = resolve_collisions(codes)
    log.info("semantic ids for %s: %d items, %d collisions resolved", data.name, len(data.item_ids), moved)
    write_index(path, dict(zip(data.item_ids, map(list, codes_to_tokens(unique)), strict=True)))
    return path


def load_index(path: str | Path, on_duplicate: Literal["error", "resolve"]) -> ItemIndex:
    index, changed = ItemIndex.from_mapping(read_index(path), source=str(path), on_duplicate=on_duplicate)
    if changed:
        log.warning("index %s: %d items shared an identifier and were given distinct ones", path, changed)
    return index


def index_key(item_id: str, offset: int) -> str:
    """The index key of a dataset item id: the id itself, or the integer id shifted by ``offset``."""
    if not offset:
        return item_id
    try:
        return str(int(item_id) + offset)
    except ValueError as err:
        raise DataError(f"data.index_key_offset needs integer item ids, got {item_id!r}") from err


def align_items(data: Interactions, index: ItemIndex, source: str, offset: int = 0) -> list[int]:
    """Index position of each item of ``data`` (key = id + ``offset``); raise if an item is not in the index."""
    positions = {item: i for i, item in enumerate(index.item_ids)}
    keys = [index_key(item, offset) for item in data.item_ids]
    missing = [item for item, key in zip(data.item_ids, keys, strict=True) if key not in positions]
    if missing:
        raise DataError(
            f"{len(missing)} items of dataset {data.name} are not in index {source} (first: {missing[:5]}); "
            "check data.index_file and data.index_key_offset"
        )
    return [positions[key] for key in keys]
