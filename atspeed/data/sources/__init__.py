"""Data sources as a table: one options class and one loader per source, all producing ``Interactions``.

``SOURCES`` maps a source's name to its row (options class, loader). A config names the options class
(``data.source.class_path``) with its fields (``data.source.init_args``); ``load_source(options)`` finds the row by
the options' class, runs its loader, then applies the shared k-core filter and refuses an empty result. Rating
filters are applied inside the loaders whose sources have ratings.

Adding a dataset: write ``FooOptions(SourceOptions)`` (a frozen, keyword-only dataclass) and ``load_foo(options) ->
Interactions`` in ``sources/foo.py``, and add the row ``"foo": Source(FooOptions, load_foo)`` below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

from atspeed.data.schema import Interactions
from atspeed.data.sources.amazon import Amazon2014Options, Amazon2018Options, load_amazon2014, load_amazon2018
from atspeed.data.sources.common import KEY, SourceOptions, kcore_filter
from atspeed.data.sources.processed import ProcessedOptions, load_processed
from atspeed.data.sources.recbole import (
    MovieLensOptions,
    RecBoleOptions,
    embedded_dataset_path,
    load_movielens,
    load_recbole,
)
from atspeed.errors import DataError


class Source(NamedTuple):
    """A row of ``SOURCES``: the source's options class and the loader that reads the data it describes."""

    options: type[SourceOptions]
    load: Callable[[Any], Interactions]


SOURCES: dict[str, Source] = {
    "movielens": Source(MovieLensOptions, load_movielens),
    "recbole": Source(RecBoleOptions, load_recbole),
    "processed": Source(ProcessedOptions, load_processed),
    "amazon2014": Source(Amazon2014Options, load_amazon2014),
    "amazon2018": Source(Amazon2018Options, load_amazon2018),
}


def source_name(options: SourceOptions) -> str:
    """The name of the ``SOURCES`` row whose options class ``options`` is."""
    for name, row in SOURCES.items():
        if type(options) is row.options:
            return name
    raise DataError(f"data.source: {type(options).__qualname__} has no row in atspeed.data.sources.SOURCES")


def load_source(options: SourceOptions) -> Interactions:
    """Load the data ``options`` describe with its source's loader, apply k-core, and refuse an empty result."""
    data = kcore_filter(SOURCES[source_name(options)].load(options), options.kcore)
    if data.num_interactions == 0:
        raise DataError(f"{data.name} is empty after filtering ({options})")
    return data


def source_options(name: str, **fields: Any) -> SourceOptions:
    """The options of source ``name`` from keyword fields (the scripts' flat flags); None values are left out."""
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}")
    options_class = SOURCES[name].options
    known = {f.name for f in dataclasses.fields(options_class)}
    given = {key: value for key, value in fields.items() if value is not None}
    if unknown := sorted(set(given) - known):
        raise DataError(f"source {name!r} takes no {', '.join(unknown)} (its options: {', '.join(sorted(known))})")
    missing = [f.name for f in dataclasses.fields(options_class) if f.name not in given and _required(f)]
    if missing:
        raise DataError(f"source {name!r} needs {', '.join(missing)}")
    return options_class(**given)


FLAT_SOURCE_KEYS = ("path", "meta_path", "name", "min_rating", "kcore")  # RecDataModule's keys before data.source


def upgrade_data_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """A data module's hyper-parameters as checkpoints before typed sources hold them (``source`` a name beside flat
    ``path``, ``kcore``, ...), in today's form (``source`` an options object); today's pass unchanged. The old
    ``recbole`` source without a path was the embedded MovieLens-100k: today's ``movielens``."""
    if not isinstance(hparams.get("source"), str):
        return hparams
    out = dict(hparams)
    flat = {key: out.pop(key) for key in FLAT_SOURCE_KEYS if key in out}
    name = "movielens" if out["source"] == "recbole" and flat.get("path") is None else out["source"]
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}")
    options_class = SOURCES[name].options
    known = {f.name for f in dataclasses.fields(options_class)}
    out["source"] = options_class(**{key: value for key, value in flat.items() if key in known and value is not None})
    return out


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


__all__ = [
    "KEY",
    "SOURCES",
    "Amazon2014Options",
    "Amazon2018Options",
    "MovieLensOptions",
    "ProcessedOptions",
    "RecBoleOptions",
    "Source",
    "SourceOptions",
    "embedded_dataset_path",
    "load_source",
    "source_name",
    "source_options",
    "upgrade_data_hparams",
]
