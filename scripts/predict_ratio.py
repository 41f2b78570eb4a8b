"""Predicted speed at a realistic size ratio (a 34.5 M-parameter target, 43x its draft) from a benchmark report.

    python scripts/predict_ratio.py --bench docs/bench/beauty_cpu.json --out docs/bench/ratio_cpu.json

Builds the two random Llamas (``atspeed.bench.ratio.SHAPES``), times their forwards on this machine as the benchmark's
cost model does (same prompt length, every tree size of the report's grid), and predicts every batch-1 row of the
report from its measured call counts and host-side time (``atspeed.bench.ratio``). Prints a Markdown table; writes a
JSON with the costs and the predicted rows. Every number it prints about speed is a prediction, not a measurement.

    python scripts/predict_ratio.py --roofline --out runs/bench/roofline.json            # the quick start's calls
    python scripts/predict_ratio.py --roofline --bench decode.json --out roofline.json   # a report's calls

--roofline: no model is built or timed; a 7B target and a 68M draft on an A100 80GB and an H100 SXM, each forward
costed by a roofline (``atspeed.bench.roofline``), with the calls per list given (--target-calls, --draft-calls, --n,
--gamma) or read from the batch-1 spec_strict rows of --bench; predicted speedup over beam search at each K and
what each ms of host work per target call costs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from atspeed.bench import roofline
from atspeed.bench.cost_model import cost_table
from atspeed.bench.ratio import SHAPES, predict, ratio_costs, table
from atspeed.bench.report import machine, write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", type=Path, help="a report of scripts/bench_decode.py (with a cost model)")
    p.add_argument("--out", type=Path, required=True, help="JSON of the ratio models' costs and the predicted rows")
    p.add_argument("--cost-repeats", type=int, default=5)
    p.add_argument("--roofline", action="store_true", help="predict a 7B / 68M pair on A100 and H100 by roofline")
    p.add_argument("--ks", nargs="+", type=int, default=[1, 3, 5, 10, 20], help="--roofline: list lengths K")
    p.add_argument("--target-calls", type=float, default=1.60, help="--roofline: target calls per list (given)")
    p.add_argument("--draft-calls", type=float, help="--roofline: draft calls per list (default min(gamma, L) x "
                   "target calls)")  # fmt: skip
    p.add_argument("--n", type=int, default=40, help="--roofline: draft beams N")
    p.add_argument("--gamma", type=int, default=3, help="--roofline: draft steps per target call")
    p.add_argument("--levels", type=int, default=4, help="--roofline: identifier tokens L (beam: L target calls)")
    p.add_argument("--prompt-tokens", type=int, default=150, help="--roofline: prompt length P")
    p.add_argument("--overhead-ms", type=float, default=0.0, help="--roofline: fixed ms added to every forward")
    p.add_argument("--host-ms", type=float, default=0.0, help="--roofline: host ms added to every target call")
    args = p.parse_args(argv)
    if args.roofline:
        return _roofline(p, args)
    if args.bench is None:
        p.error("--bench: required (unless --roofline)")
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


def _roofline(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if min(args.ks) < 1 or max(args.ks) > args.n or args.gamma < 1 or args.target_calls < 1:
        p.error(f"--roofline: need 1 <= K <= N = {args.n}, --gamma >= 1, --target-calls >= 1")
    if args.overhead_ms < 0 or args.host_ms < 0 or args.prompt_tokens < 1:
        p.error("--overhead-ms / --host-ms must be >= 0 and --prompt-tokens >= 1")
    source = "given"
    calls = roofline.given_calls(args.ks, args.target_calls, args.n, args.gamma, args.draft_calls, args.levels)
    if args.bench is not None:
        if not args.bench.is_file():
            p.error(f"--bench: not found: {args.bench}")
        calls = roofline.calls_from_report(json.loads(args.bench.read_text()), args.ks, args.n, args.gamma)
        if not calls:
            p.error(f"--bench: no batch-1 spec_strict row with N = {args.n}, gamma = {args.gamma} at K in {args.ks}")
        source = str(args.bench)
    rows = roofline.predict(calls, args.levels, args.prompt_tokens, args.overhead_ms, args.host_ms)
    print(f"PREDICTED (roofline, not measured): 7B target / 68M draft, bf16, batch 1, P = {args.prompt_tokens}, "
          f"L = {args.levels}, overhead {args.overhead_ms} ms/forward, host {args.host_ms} ms/target call; "
          f"calls: {source}")  # fmt: skip
    print(roofline.table(rows))
    settings = {k: getattr(args, k) for k in ("levels", "prompt_tokens", "overhead_ms", "host_ms", "n", "gamma")}
    models = [vars(m) for m in (roofline.TARGET_7B, roofline.DRAFT_68M)]
    hardware = [vars(h) for h in roofline.HARDWARE]
    write_json(args.out, {"benchmark": "roofline (predicted)", "calls_from": source, "settings": settings,
                          "hardware": hardware, "models": models, "rows": rows})  # fmt: skip
    print(f"wrote {len(rows)} predicted rows to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
