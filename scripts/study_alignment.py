"""Draft-alignment study (issue 20): aligned drafts per loss and seed, each decoded against the same target.

    python scripts/study_alignment.py --requests 1000            # Beauty: trains what is missing, then decodes
    python scripts/study_alignment.py --losses sft atspeed_s --seeds 0 --sliding-losses --on-policy-losses \\
        --large-losses --ks 10 --requests 64                      # a quicker look

Training (atspeed.pipeline stages; a stage whose output exists is skipped, so a rerun continues): the target
(<configs>/target_sft.yaml), the SFT draft (draft_sft.yaml), the teacher data (teacher.yaml, last sample per user);
the teacher data of every prefix (sliding) when --sliding-losses is not empty; a larger SFT draft (draft_sft.yaml with
--large-draft sizes, under <runs>/draft_large) when --large-losses is not empty. Then per seed of --seeds: per loss of
--losses an alignment from the SFT draft (align.yaml, under <runs>/study/<loss>/seed<s>, seed_everything = s), per
loss of --sliding-losses the same on the sliding teacher data (<loss>+sliding), per loss of --on-policy-losses with
on-policy batches (<loss>+on_policy), per loss of --large-losses from the larger SFT draft (<loss>@large).
atspeed_s_authors trains with the authors' train.sh settings (alpha 0.7, ce_on all, top-k --authors-top-k, softmax
temperature 0.001), every other loss with align.yaml's. --steps sets every alignment's max_steps; --stage-args (one
string) is appended to every stage's command.

Decoding (batch size 1, --requests test requests of a seeded subset): the references (beam, beam_sample and, where
the decoder table has it, beam_sample_keyed) once per K, then every draft with every decoder of --decoders at every K
of --ks (N = --draft-beams, gamma = --gamma). Rows go to <out>.partial.json as they are decoded: a rerun skips the
rows it holds. Writes the JSON report (--out) with every row of that file, so runs with narrower plans (a K sweep for
one seed, the relaxed decoders over all test users with --requests 3553) add up to one report; a PNG of calls per
list against K with error bars (--plot); and prints the tables (call counts from the --requests rows) and the "paper
claim -> reproduced here? -> evidence" table in markdown.
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
from atspeed.bench import study_decode, study_plot, study_tables
from atspeed.bench.decode_bench import check_grid
from atspeed.bench.report import check_timing_flags, machine, write_json
from atspeed.bench.workload import load_workload, parameters
from atspeed.cli import show_atspeed_logs
from atspeed.data.sources import SOURCES
from atspeed.decoding.decoders import DECODERS
from atspeed.losses import LossName
from atspeed.pipeline import run_stages

log = logging.getLogger("atspeed.study")


def _sizes(text: str) -> dict:
    try:
        return study.check_sizes(json.loads(text))
    except (json.JSONDecodeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--configs", type=Path, default=Path("configs/beauty"), help="{target,draft}_sft, teacher, align")
    p.add_argument("--runs", type=Path, default=Path("runs/beauty"), help="stage outputs (where configs put them)")
    losses = get_args(LossName)
    p.add_argument("--losses", nargs="+", choices=losses, default=list(study.DEFAULT_LOSSES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="alignment seeds of every aligned draft")
    p.add_argument("--sliding-losses", nargs="*", choices=losses, default=list(study.DEFAULT_SLIDING_LOSSES))
    p.add_argument("--on-policy-losses", nargs="*", choices=losses, default=list(study.DEFAULT_ON_POLICY_LOSSES))
    p.add_argument("--large-losses", nargs="*", choices=losses, default=list(study.DEFAULT_LARGE_LOSSES))
    p.add_argument("--large-draft", type=_sizes, default=dict(study.DEFAULT_LARGE_DRAFT), help="JSON ModelSpec sizes")
    p.add_argument("--authors-top-k", type=int, default=study.AUTHORS_TOP_K, help="atspeed_s_authors' top-k support")
    p.add_argument("--steps", type=int, help="max_steps of every alignment (default: align.yaml's)")
    p.add_argument(
        "--stage-args",
        default="",
        help="appended to every stage, one string: --stage-args='--data.source.init_args.path d'",
    )
    p.add_argument("--decoders", nargs="+", choices=sorted(DECODERS), default=list(study_decode.default_decoders()))
    p.add_argument("--source", choices=sorted(SOURCES), default="processed")
    p.add_argument("--data", default="../shared/data/amazon-beauty", help="dataset directory or file (decoding)")
    p.add_argument("--index-key-offset", type=int, default=-1)
    p.add_argument("--split", default="global_time", choices=["global_time", "leave_one_out"])
    p.add_argument("--requests", type=int, default=1000, help="test requests decoded by every configuration")
    p.add_argument("--ks", nargs="+", type=int, default=[1, 3, 5, 10, 20], help="list lengths K (= beams)")
    p.add_argument("--draft-beams", type=int, default=40, help="N")
    p.add_argument("--gamma", type=int, default=3, help="draft steps per target call")
    p.add_argument("--repeats", type=int, default=1, help="timed passes per configuration (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed decodes of the first request before timing")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0, help="request subset and sampling decoders' seed")
    p.add_argument("--out", type=Path, default=Path("docs/bench/alignment_beauty.json"), help="JSON report")
    p.add_argument("--plot", type=Path, default=Path("docs/bench/alignment_beauty.png"), help="PNG of calls vs K")
    return p


def resolve(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Check every value before anything trains or loads (argparse errors name the flag)."""
    check_timing_flags(p, args)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.authors_top_k < 2:
        p.error(f"--authors-top-k must be >= 2, got {args.authors_top_k}")
    try:
        args.stage_argv = shlex.split(args.stage_args)
        check_grid(args.ks, [1], [args.draft_beams], [args.gamma], [args.requests])
    except ValueError as err:
        p.error(str(err) if str(err).startswith("--") else f"--stage-args: {err}")
    if not Path(args.data).exists():
        p.error(f"--data: not found: {args.data}")
    return args


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = resolve(p, p.parse_args(argv))
    show_atspeed_logs()  # the stages' own lines and this script's, once each (atspeed.* loggers)
    plan = study.StudyPlan(
        tuple(args.losses),
        tuple(args.seeds),
        tuple(args.sliding_losses),
        tuple(args.on_policy_losses),
        tuple(args.large_losses),
    )
    drafts = plan.drafts()
    settings = study.StageSettings(
        args.configs, args.runs, args.steps, tuple(args.stage_argv), tuple(args.large_draft.items()), args.authors_top_k
    )
    stages = study.study_stages(settings, drafts)
    if missing := study.missing_configs(stages):
        p.error(f"--configs: config files of stages still to run not found: {', '.join(missing)}")
    started, load_before = time.perf_counter(), os.getloadavg()
    ran = run_stages(stages)  # a failing stage raises SystemExit with its code
    trained = time.perf_counter()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    try:
        work = load_workload(
            str(args.runs / "target" / "hf"),
            str(drafts[0].path(args.runs)),
            args.requests,
            args.source,
            args.data,
            args.index_key_offset,
            args.split,
            args.dtype,
            args.seed,
        )
    except ValueError as err:  # DataError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    work = work.to(device)
    decode = study_decode.DecodePlan(
        tuple(args.decoders),
        study_decode.default_references(),
        tuple(args.ks),
        args.draft_beams,
        args.gamma,
        args.requests,
        args.seed,
        args.repeats,
        args.warmup,
        args.dtype,
    )
    partial = study_decode.PartialRows(args.out.with_suffix(".partial.json"))
    study_decode.decode_study(work, args.runs, drafts, decode, partial, device)
    rows = partial.rows  # every row decoded for --out so far, by this plan or an earlier one (module docstring)
    report = _report(args, argv, work, drafts, ran, rows, started, trained, load_before, partial.decoded)
    write_json(args.out, report)
    _print_tables(args, rows, work.levels)
    print(f"wrote {len(rows)} rows to {args.out} ({partial.decoded} decoded by this run)")
    return 0


def _report(args, argv, work, drafts, ran, rows, started, trained, load_before, decoded) -> dict:
    host = machine(torch.device(args.device)) | {
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    keys = (
        "losses",
        "seeds",
        "sliding_losses",
        "on_policy_losses",
        "large_losses",
        "large_draft",
        "authors_top_k",
        "steps",
        "stage_args",
        "decoders",
        "requests",
        "ks",
        "draft_beams",
        "gamma",
        "repeats",
        "warmup",
        "dtype",
        "device",
        "seed",
    )
    return {
        "benchmark": "alignment_study",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv] if argv is None else ["scripts/study_alignment.py", *argv]),
        "machine": host,
        "models": {
            "target_parameters": parameters(work.target),
            "levels": work.levels,
            **work.info,
            "drafts": {
                d.label: {"loss": d.loss, "seed": d.seed, "group": d.group, "path": str(d.path(args.runs))}
                for d in drafts
            },
        },
        "settings": {key: getattr(args, key) for key in keys}
        | {"configs": str(args.configs), "runs": str(args.runs), "batch_size": 1},
        "stages": ran,
        "training_seconds": trained - started,
        "decoding_seconds": time.perf_counter() - trained,
        "rows_decoded_by_this_run": decoded,
        "alignment": {d.label: study.last_validation(d.path(args.runs).parent) for d in drafts if d.seed is not None},
        "rows": rows,
    }


def _print_tables(args, rows: list[dict], levels: int) -> None:
    every = study_tables.aggregate(rows)
    agg = [e for e in every if e["requests"] == args.requests]  # call counts: the --requests rows
    k = 10 if 10 in args.ks else max(args.ks)
    n, gamma = args.draft_beams, args.gamma
    decoders = tuple(dict.fromkeys(e["decoder"] for e in agg if e["group"] is not None))
    for decoder in decoders:
        print(study_tables.calls_table(agg, decoder, n, gamma), end="\n\n")
    print(study_tables.accuracy_table(every, k, n, gamma), end="\n\n")
    print(study_tables.exactness_table(rows), end="\n\n")
    print(study_tables.claims_table(every, k, n, gamma, levels, requests=args.requests), end="\n\n")
    title = f"{args.data}: {len(rows)} rows, {args.requests} requests"
    if study_plot.plot_calls(args.plot, agg, decoders, n, gamma, title):
        print(f"wrote {args.plot}")
    else:
        print("matplotlib is not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
