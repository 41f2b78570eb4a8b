"""Build a semantic-id item index for a dataset and write it in the authors' / LC-Rec JSON format.

    python scripts/build_index.py --source movielens --out runs/ml-100k.index.json --levels 4 --codebook-size 32
    python scripts/build_index.py --source amazon2018 --path Beauty_5.json --meta-path meta_Beauty.json \
        --min-rating 4 --out beauty.index.json

The JSON then works as ``data.index_file`` in any config (and with other tools that read that format).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from atspeed.atomic import write_text_atomic
from atspeed.data.index_file import read_index
from atspeed.data.item_index import SemanticIdSpec, build_index
from atspeed.data.sources import SOURCES, load_source, source_options
from atspeed.errors import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=list(SOURCES), default="movielens")
    parser.add_argument("--path", help="dataset directory or reviews file (not for movielens)")
    parser.add_argument("--meta-path")
    parser.add_argument("--min-rating", type=float)
    parser.add_argument("--kcore", type=int, default=0)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--embeddings-file", help="[num_items, D] .npy/.pt instead of embedding item text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[atspeed] %(message)s")
    try:
        spec = SemanticIdSpec(args.levels, args.codebook_size, args.embeddings_file, args.seed)
        fields = {"path": args.path, "meta_path": args.meta_path, "min_rating": args.min_rating, "kcore": args.kcore}
        data = load_source(source_options(args.source, **fields))
        cached = build_index(data, spec, args.out.parent / ".atspeed-cache")
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_text_atomic(args.out, cached.read_text(encoding="utf-8"))
    print(f"wrote {len(read_index(args.out))} item identifiers to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
