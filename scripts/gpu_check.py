"""The prepared GPU check: ``python scripts/gpu_check.py OUT [--tiny]`` (``scripts/gpu_check.sh`` wraps it).

ATSPEED_DEVICE selects the device (default cuda). Writes OUT/gpu_check.json and OUT/gpu_check.md after every section
(``atspeed.bench.gpu_check`` lists them); exits 0 when every section ran (ok or skipped), 1 when one failed or ran
out of time, 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from atspeed.bench.gpu_check import run_check


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output directory (gpu_check.json, gpu_check.md, smoke_bf16.json)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and a small grid (a CPU check of this script)")
    args = p.parse_args(argv)
    name = os.environ.get("ATSPEED_DEVICE", "cuda")
    try:
        device = torch.device(name)
    except RuntimeError:
        p.error(f"ATSPEED_DEVICE: not a torch device: {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"ATSPEED_DEVICE={name}: no CUDA device available (ATSPEED_DEVICE=cpu with --tiny checks the script)")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"OUT: not a directory: {args.out}")
    report = run_check(args.out, device, args.tiny)
    statuses = {name: s["status"] for name, s in report["sections"].items()}
    print(f"{statuses}; wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    return 0 if all(s in ("ok", "skipped") for s in statuses.values()) and not report["nonfinite"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
