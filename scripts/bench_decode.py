"""Decoding benchmark: HF generate, beam search, sampling beam search and the speculative decoders on the same requests.

    python scripts/bench_decode.py                      # Beauty: runs/beauty/{target,draft}/hf, the full grid
    python scripts/bench_decode.py --ks 10 --batch-sizes 1 --requests 8 --repeats 1   # a quick look
    python scripts/bench_decode.py --preset smoke       # tiny random models, small grid, under a minute

For each batch size b and K: hf_beam (``generate(num_beams=K, num_return_sequences=K, prefix_allowed_tokens_fn)``),
beam, beam_sample, beam_sample_keyed, then spec_strict / spec_relaxed / spec_relaxed_exact / spec_keyed for every N in
--draft-beams with N >= K, every gamma in --gammas and every budget M in --budgets (--self-draft adds spec_strict with
the target as its own draft). Each configuration decodes the same requests (the first --requests of a seeded random test
subset): --warmup decodes of one batch, then --repeats timed passes; rows report the median seconds per list, speedups
vs HF generate and vs beam search at the same K and b, target/draft calls per list, drafted nodes verified per call,
accepted depths and, for beam and spec_strict, whether every list equals HF generate's (identifiers equal, scores within
1e-3).
Writes a JSON report (--out), a PNG of speedup vs K (--plot, needs matplotlib) and prints the table; with
--wandb-project the rows also go to a W&B run as a table and the plot as an image (offline unless WANDB_MODE says
otherwise or an API key is configured; the run lands under --wandb-dir). torch threads
come from the environment (OMP_NUM_THREADS); the header records the 1/5/15-minute load averages before and after,
since other work on the machine skews timings.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import get_args

import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from atspeed.bench.cost_model import cost_table, forward_costs, predicted_ms_per_list, tree_sizes
from atspeed.bench.decode_bench import build_grid, check_grid, run_grid
from atspeed.bench.report import check_timing_flags, machine, plot_speedups, table, write_json
from atspeed.bench.workload import load_workload, parameters, smoke_workload
from atspeed.data.sources import SOURCES
from atspeed.decoding.checks import vocab_size
from atspeed.decoding.decoders import DECODERS, DecoderName
from atspeed.decoding.options import parse_budget
from atspeed.wandb_log import log_bench_run, wandb_mode

log = logging.getLogger("atspeed.bench")

# Grid defaults per preset; a flag given on the command line wins. "full": ~300 configurations with all six
# decoders (see docs/BENCHMARKS.md for its time here). With L = 4 identifier tokens, gamma > 4 behaves as gamma = 4.
PRESETS = {
    "full": {"ks": [1, 5, 10, 20], "batch_sizes": [1, 16], "draft_beams": [10, 40], "gammas": [1, 3],
             "budgets": [None, 20, "auto"], "requests": [32, 64], "repeats": 3, "warmup": 1,
             "out": "runs/bench/decode.json", "plot": "runs/bench/decode.png"},
    "smoke": {"ks": [1, 3, 5], "batch_sizes": [1, 4], "draft_beams": [6], "gammas": [2, 3], "budgets": [None, "auto"],
              "requests": [4, 8], "repeats": 2, "warmup": 1, "out": "runs/bench/decode_smoke.json",
              "plot": "runs/bench/decode_smoke.png"},
}  # fmt: skip
SETTINGS = ("decoders", "ks", "batch_sizes", "draft_beams", "gammas", "budgets", "self_draft", "repeats", "warmup",
            "dtype", "device", "seed")  # fmt: skip
GRID_KEYS = ("ks", "batch_sizes", "draft_beams", "gammas", "budgets", "requests", "repeats", "warmup", "out", "plot")


def parser() -> ArgumentParser:
    """The flags, on jsonargparse as the CLI is: ``--config bench.yaml`` reads them from a file, ``--print_config``
    writes one."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of these flags (see --print_config)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="full",
        help="full: exported models and data below; smoke: tiny random models built in memory",
    )
    p.add_argument("--target", default="runs/beauty/target/hf", help="exported target directory")
    p.add_argument("--draft", default="runs/beauty/draft/hf", help="exported draft directory (same index)")
    p.add_argument("--source", choices=sorted(SOURCES), default="processed")
    p.add_argument("--data", default="../shared/data/amazon-beauty", help="dataset directory or file")
    p.add_argument("--index-key-offset", type=int, default=-1)
    p.add_argument("--split", default="global_time", choices=["global_time", "leave_one_out"])
    p.add_argument("--decoders", nargs="+", choices=get_args(DecoderName), default=list(get_args(DecoderName)))
    p.add_argument("--ks", nargs="+", type=int, help="list lengths K (= beams)")
    p.add_argument("--batch-sizes", nargs="+", type=int)
    p.add_argument("--draft-beams", nargs="+", type=int, help="N values; each K runs those with N >= K")
    p.add_argument("--gammas", nargs="+", type=int, help="draft steps per target call")
    p.add_argument(
        "--budgets",
        nargs="+",
        type=parse_budget,
        help="M, drafted nodes verified per call, for every speculative configuration: integers, "
        "none (the whole tree), auto (planned per call from the cost model and the acceptance)",
    )
    p.add_argument(
        "--self-draft",
        action="store_true",
        help="add spec_strict with the target as its own draft (a perfect draft; N = K, gamma = L)",
    )
    p.add_argument(
        "--requests",
        nargs="+",
        type=int,
        help="lists per configuration: one value, or one per batch size (a multiple of it)",
    )
    p.add_argument("--repeats", type=int, help="timed passes per configuration (the median is reported)")
    p.add_argument("--warmup", type=int, help="untimed decodes of the first batch before timing")
    p.add_argument("--cost-repeats", type=int, default=5,
                   help="timed forwards per token count of the cost model (target and draft, 1 to the largest tree "
                        "K + gamma x N, after the longest prompt); 0 skips it")  # fmt: skip
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON report")
    p.add_argument("--plot", type=Path, help="PNG of speedup vs K")
    p.add_argument("--wandb-project", help="also log the rows (a table) and the plot (an image) to this W&B project")
    p.add_argument("--wandb-entity", help="W&B entity (user or team) of --wandb-project; default: yours")
    p.add_argument("--wandb-dir", type=Path, default=Path("runs/wandb"), help="where the W&B run directory goes")
    return p


def resolve(p: ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset grid flags from the preset and check every value (argparse errors name the flag)."""
    for key in GRID_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, PRESETS[args.preset][key])
    if len(args.requests) == 1:
        args.requests = args.requests * len(args.batch_sizes)
    if len(args.requests) != len(args.batch_sizes):
        p.error(f"--requests: give one value or one per batch size ({len(args.batch_sizes)}), got {args.requests}")
    check_timing_flags(p, args)
    if args.cost_repeats < 0:
        p.error(f"--cost-repeats must be >= 0, got {args.cost_repeats}")
    if args.wandb_entity and not args.wandb_project:
        p.error("--wandb-entity: give --wandb-project too")
    try:
        speculative = any(DECODERS[d].needs_draft for d in args.decoders)
        check_grid(args.ks, args.batch_sizes, args.draft_beams, args.gammas, args.requests, speculative)
    except ValueError as err:
        p.error(str(err))
    if args.preset != "smoke":
        for flag, path in (("--target", args.target), ("--draft", args.draft)):
            if not Path(path).is_dir():
                p.error(f"{flag}: directory not found: {path}")
        if not Path(args.data).exists():
            p.error(f"--data: not found: {args.data}")
    return args


def cost_model(args: argparse.Namespace, work, rows: list[dict]) -> dict | None:
    """One forward's cost against its tokens, on the longest request's prompt, and each row's prediction from it
    (batch 1); None with --cost-repeats 0."""
    if not args.cost_repeats:
        return None
    prompt = max(work.prompts[: max(args.requests)], key=len)
    sizes = tree_sizes(args.ks, args.draft_beams, args.gammas)
    costs = {"prompt_tokens": len(prompt), "ms": {
        name: forward_costs(model, prompt, sizes, args.cost_repeats)
        for name, model in (("target", work.target), ("draft", work.draft))
    }}  # fmt: skip
    for row in rows:  # what the forward costs and the row's own call counts predict (batch 1)
        row["predicted_ms_per_list"] = predicted_ms_per_list(row, costs["ms"]["target"], costs["ms"]["draft"],
                                                             work.levels)  # fmt: skip
    return costs


def publish(args: argparse.Namespace, report: dict, work) -> None:
    """The table on stdout, the JSON, the plot and (with --wandb-project) the W&B run."""
    rows, costs, host = report["rows"], report["cost_model"], report["machine"]
    print(table(rows))
    if costs is not None:
        print(f"\nms per forward after a {costs['prompt_tokens']}-token prompt (batch 1):\n{cost_table(costs['ms'])}")
    write_json(args.out, report)
    print(f"wrote {len(rows)} rows to {args.out}")
    where = f"{host['device_name'] or host['cpu']}, {host['torch_threads']} threads"
    title = f"{work.info.get('dataset') or args.preset}: {where}"
    plotted = plot_speedups(args.plot, rows, title)
    if plotted:
        print(f"wrote {args.plot}")
    else:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    if args.wandb_project:
        images = {"speedup_vs_hf": args.plot} if plotted else {}
        run = log_bench_run(report, images, args.wandb_project, args.wandb_entity, args.wandb_dir)
        print(f"logged the table{' and the plot' if plotted else ''} to the W&B run {run} ({wandb_mode()})")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = resolve(p, p.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    started, load_before = time.perf_counter(), os.getloadavg()
    try:
        if args.preset == "smoke":
            work = smoke_workload(max(args.requests), args.dtype, args.seed)
        else:
            work = load_workload(args.target, args.draft, max(args.requests), args.source, args.data,
                                 args.index_key_offset, args.split, args.dtype, args.seed)  # fmt: skip
    except ValueError as err:  # DataError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    work = work.to(device)
    requests = dict(zip(args.batch_sizes, args.requests, strict=True))
    grid = build_grid(args.decoders, args.ks, args.batch_sizes, args.draft_beams, args.gammas, args.budgets,
                      work.levels if args.self_draft else None)  # fmt: skip
    log.info("%d configurations, %s lists each (by batch size)", len(grid), requests)

    done = []

    def progress(row: dict) -> None:
        done.append(row)
        spec = f" N={row['N']} gamma={row['gamma']} M={row['budget']} draft={row['draft']}" if row["N"] else ""
        log.info("[%d/%d %.0fs] %s K=%d b=%d%s: %.2f ms/list", len(done), len(grid), time.perf_counter() - started,
                 row["decoder"], row["K"], row["batch_size"], spec, row["ms_per_list"])  # fmt: skip

    rows = run_grid(grid, work, requests, device, args.repeats, args.warmup, args.seed, progress)
    costs = cost_model(args, work, rows)
    host = machine(device) | {"load_average_before": load_before, "load_average_after": os.getloadavg()}
    report = {
        "benchmark": "decode",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv] if argv is None else ["scripts/bench_decode.py", *argv]),
        "preset": args.preset,
        "machine": host,
        "models": {"target_parameters": parameters(work.target), "draft_parameters": parameters(work.draft),
                   "levels": work.levels, "vocab_size": vocab_size(work.target), **work.info},
        "settings": {key: getattr(args, key) for key in SETTINGS} | {"requests": requests},
        "total_seconds": time.perf_counter() - started,
        "cost_model": costs,
        "rows": rows,
    }  # fmt: skip
    publish(args, report, work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
