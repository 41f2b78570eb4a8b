"""Draft-alignment study: one draft per alignment loss, each timed in speculative decoding against the same target.

    python scripts/study_alignment.py                   # Beauty: trains what is missing under runs/beauty, decodes
    python scripts/study_alignment.py --losses sft atspeed_s --second-losses --requests 16   # a quicker look

Training (through atspeed.pipeline stages; a stage whose output exists is skipped, so a rerun continues): the target
(<configs>/target_sft.yaml), the non-aligned SFT draft (draft_sft.yaml) and the teacher data (teacher.yaml), whose
configs must write under --runs; then per loss of --losses a draft aligned from the SFT draft (align.yaml, under
<runs>/study/<loss>), and per loss of --second-losses a draft of the --second-draft sizes aligned from scratch
(<runs>/study/<loss>@h<hidden>l<layers>). --steps sets every alignment's max_steps; --stage-args (one string) is
appended to every stage's command. Decoding (batch size 1, the first --requests of a seeded random test subset): the
references hf_beam and beam once per K, then for every draft (the SFT one as loss "none") spec_strict and spec_relaxed
at every K of --ks with N = --draft-beams and gamma = --gamma, and at every K of --search-ks over --search-draft-beams
x --search-gammas ("best" marks the fastest). Writes a JSON report (--out: header with machine and load averages,
every alignment's last validation metrics, one row per draft, decoder, K, N, gamma), a PNG of target calls per list
against K (--plot, needs matplotlib), and prints two markdown tables. torch threads come from the environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import get_args

import torch

from atspeed.bench import alignment_study as study
from atspeed.bench.report import check_timing_flags, machine, write_json
from atspeed.bench.workload import load_workload, parameters
from atspeed.cli import show_atspeed_logs
from atspeed.data.sources import SOURCES
from atspeed.losses import LossName
from atspeed.pipeline import run_stages

log = logging.getLogger("atspeed.study")
SETTINGS = (
    "losses", "second_losses", "second_draft", "steps", "stage_args", "requests", "ks", "draft_beams", "gamma",
    "search_ks", "search_draft_beams", "search_gammas", "repeats", "warmup", "dtype", "device", "seed",
)  # fmt: skip


def _sizes(text: str) -> dict:
    try:
        return study.check_sizes(json.loads(text))
    except (json.JSONDecodeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument(
        "--configs", type=Path, default=Path("configs/beauty"), help="{target,draft}_sft, teacher, align.yaml"
    )
    p.add_argument("--runs", type=Path, default=Path("runs/beauty"), help="stage outputs (where configs put them)")
    losses = get_args(LossName)
    p.add_argument(
        "--losses", nargs="+", choices=losses, default=list(study.DEFAULT_LOSSES), help="one aligned draft each"
    )
    p.add_argument(
        "--second-losses",
        nargs="*",
        choices=losses,
        default=list(study.DEFAULT_SECOND_LOSSES),
        help="one draft of the second size each (none given: no second size)",
    )
    p.add_argument(
        "--second-draft",
        type=_sizes,
        default=dict(study.DEFAULT_SECOND_DRAFT),
        help="JSON object of the second draft's sizes (ModelSpec fields), trained from scratch",
    )
    p.add_argument("--steps", type=int, help="max_steps of every alignment (default: align.yaml's)")
    p.add_argument(
        "--stage-args",
        default="",
        help="CLI arguments appended to every stage, one string: --stage-args='--data.source.init_args.path d ...'",
    )
    p.add_argument("--source", choices=sorted(SOURCES), default="processed")
    p.add_argument("--data", default="../shared/data/amazon-beauty", help="dataset directory or file (decoding)")
    p.add_argument("--index-key-offset", type=int, default=-1)
    p.add_argument("--split", default="global_time", choices=["global_time", "leave_one_out"])
    p.add_argument("--requests", type=int, default=64, help="test requests decoded by every configuration")
    p.add_argument("--ks", nargs="+", type=int, default=[1, 3, 5, 10, 20], help="list lengths K (= beams)")
    p.add_argument("--draft-beams", type=int, default=40, help="N at every K of --ks")
    p.add_argument("--gamma", type=int, default=3, help="draft steps per target call at every K of --ks")
    p.add_argument("--search-ks", nargs="+", type=int, default=[10], help="K values of the (N, gamma) search")
    p.add_argument("--search-draft-beams", nargs="+", type=int, default=[10, 20, 40])
    p.add_argument("--search-gammas", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--repeats", type=int, default=1, help="timed passes per configuration (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed decodes of the first request before timing")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/bench/alignment_beauty.json"), help="JSON report")
    p.add_argument("--plot", type=Path, default=Path("docs/bench/alignment_beauty.png"), help="PNG of calls vs K")
    return p


def resolve(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Check every value before anything trains or loads (argparse errors name the flag)."""
    check_timing_flags(p, args)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    try:
        args.stage_argv = shlex.split(args.stage_args)
    except ValueError as err:
        p.error(f"--stage-args: {err}")
    args.grid = study.StudyGrid(tuple(args.ks), args.draft_beams, args.gamma, tuple(args.search_ks),
                          tuple(args.search_draft_beams), tuple(args.search_gammas))  # fmt: skip
    try:
        args.grid.check(args.requests)
    except ValueError as err:
        p.error(str(err))
    if not Path(args.data).exists():
        p.error(f"--data: not found: {args.data}")
    return args


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = resolve(p, p.parse_args(argv))
    show_atspeed_logs()  # the stages' own lines and this script's, once each (atspeed.* loggers)
    drafts = study.study_drafts(args.runs, args.losses, args.second_losses, args.second_draft)
    stages = study.study_stages(args.configs, args.runs, drafts, args.steps, args.stage_argv)
    if missing := study.missing_configs(stages):
        p.error(f"--configs: config files of stages still to run not found: {', '.join(missing)}")
    started, load_before = time.perf_counter(), os.getloadavg()
    ran = run_stages(stages)  # a failing stage raises SystemExit with its code
    trained = time.perf_counter()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    try:
        work = load_workload(str(args.runs / "target" / "hf"), str(drafts[0].path), args.requests, args.source,
                             args.data, args.index_key_offset, args.split, args.dtype, args.seed)  # fmt: skip
    except ValueError as err:  # DataError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    work = work.to(device)
    total = len(args.grid.references()) + len(drafts) * len(args.grid.speculative())
    done = []

    def progress(row: dict) -> None:
        done.append(row)
        spec = f" N={row['N']} gamma={row['gamma']}" if row["N"] is not None else ""
        log.info("[%d/%d %.0fs] %s K=%d%s: %.2f ms/list", len(done), total, time.perf_counter() - trained,
                 row["decoder"], row["K"], spec, 1e3 * row["seconds_per_list"])  # fmt: skip

    timing = study.Timing(device, args.repeats, args.warmup, args.seed, args.dtype)
    rows = study.decode_study(work, drafts, args.grid, timing, progress)
    host = machine(device) | {"load_average_before": load_before, "load_average_after": os.getloadavg()}
    report = {
        "benchmark": "alignment_study",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv] if argv is None else ["scripts/study_alignment.py", *argv]),
        "machine": host,
        "models": {"target_parameters": parameters(work.target), "levels": work.levels, **work.info,
                   "drafts": {d.label: {"loss": d.loss, "path": str(d.path), "sizes": d.sizes} for d in drafts}},
        "settings": {key: getattr(args, key) for key in SETTINGS} | {"configs": str(args.configs),
                                                                     "runs": str(args.runs), "batch_size": 1},
        "stages": ran,
        "training_seconds": trained - started,
        "total_seconds": time.perf_counter() - started,
        "alignment": {d.label: study.last_validation(d.path.parent) for d in drafts[1:]},
        "rows": rows,
    }  # fmt: skip
    k, n, gamma = args.grid.table_k, args.draft_beams, args.gamma
    print(study.results_table(rows, k, n, gamma), study.calls_table(rows, n, gamma), sep="\n\n")
    write_json(args.out, report)
    print(f"wrote {len(rows)} rows to {args.out}")
    where = f"{host['device_name'] or host['cpu']}, {host['torch_threads']} threads"
    if study.plot_calls(args.plot, rows, n, gamma, f"{work.info.get('dataset') or args.data}: {where}"):
        print(f"wrote {args.plot}")
    else:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
