"""Build a semantic-id item index for a dataset and write it in the authors' / LC-Rec JSON format.

    python scripts/build_index.py --source recbole --out runs/ml-100k.index.json --levels 4 --codebook-size 32
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
from atspeed.data.sources import SOURCES, LoadOptions, embedded_dataset_path, load_source
from atspeed.errors import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=sorted(SOURCES), default="recbole")
    parser.add_argument("--path", type=Path, help="dataset directory or reviews file (default: embedded ml-100k)")
    parser.add_argument("--meta-path", type=Path)
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
        path = args.path if args.path is not None else embedded_dataset_path()
        data = load_source(args.source, LoadOptions(path, args.meta_path, args.min_rating, args.kcore))
        cached = build_index(data, spec, args.out.parent / ".atspeed-cache")
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_text_atomic(args.out, cached.read_text(encoding="utf-8"))
    print(f"wrote {len(read_index(args.out))} item identifiers to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
