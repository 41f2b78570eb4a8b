"""Predicted speed at a realistic size ratio (a 34.5 M-parameter target, 43x its draft) from a benchmark report.

    python scripts/predict_ratio.py --bench docs/bench/beauty_cpu.json --out docs/bench/ratio_cpu.json

Builds the two random Llamas (``atspeed.bench.ratio.SHAPES``), times their forwards on this machine as the benchmark's
cost model does (same prompt length, every tree size of the report's grid), and predicts every batch-1 row of the
report from its measured call counts and host-side time (``atspeed.bench.ratio``). Prints a Markdown table; writes a
JSON with the costs and the predicted rows. Every number it prints about speed is a prediction, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from atspeed.bench.cost_model import cost_table
from atspeed.bench.ratio import SHAPES, predict, ratio_costs, table
from atspeed.bench.report import machine, write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", type=Path, required=True, help="a report of scripts/bench_decode.py with a cost model")
    p.add_argument("--out", type=Path, required=True, help="JSON of the ratio models' costs and the predicted rows")
    p.add_argument("--cost-repeats", type=int, default=5)
    args = p.parse_args(argv)
    if not args.bench.is_file():
        p.error(f"--bench: not found: {args.bench}")
    report = json.loads(args.bench.read_text())
    if not report.get("cost_model"):
        p.error(f"--bench: {args.bench} has no cost model (run the benchmark with --cost-repeats > 0)")
    costs = ratio_costs(report, args.cost_repeats)
    rows = predict(report, costs["ms"])
    print(f"ratio models: target {costs['parameters']['target']:,} / draft {costs['parameters']['draft']:,} parameters")
    print(f"ms per forward after a {costs['prompt_tokens']}-token prompt (batch 1):\n{cost_table(costs['ms'])}\n")
    print(table(rows))
    host = machine(torch.device("cpu"))
    write_json(args.out, {"benchmark": "ratio (predicted)", "from": str(args.bench), "machine": host,
                          "shapes": SHAPES, "costs": costs, "rows": rows})  # fmt: skip
    print(f"wrote {len(rows)} predicted rows to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
