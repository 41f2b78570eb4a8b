"""``python -m atspeed pipeline FILE``: run CLI stages in order, skipping those whose output exists, then summarise.

A pipeline file (YAML) names the stages in order; each is one ordinary CLI command (what ``python -m atspeed`` takes)
and the output that only a finished run of it leaves (an export directory, a ``manifest.json``, a ``report.json``)::

    stages:
      - name: target
        run: fit --config configs/quickstart/target_sft.yaml --ckpt_path last
        output: runs/quickstart/target/hf
      - name: decode_beam
        run: predict --config configs/quickstart/decode.yaml --model.init_args.decoding.decoder beam ...
        output: runs/quickstart/decode/beam/report.json
    summary: runs/quickstart/summary.json

The file is the command's config (``pipeline FILE`` is ``pipeline --config FILE``; its schema is
``atspeed.pipeline_file``'s, parsed by jsonargparse like every command): ``--help`` lists its keys, ``--print_config``
prints it as parsed, and ``--summary PATH`` or ``--stages`` after it override its keys.

A stage whose output exists is skipped; the others run in order, in this process, exactly as the printed
``python -m atspeed ...`` command would run them on their own. Fit stages given ``--ckpt_path last`` continue from
their last checkpoint and the teacher stage after its complete shards, so rerunning the pipeline after an
interruption continues where it stopped. At the end the stages' decode reports (``DecodeReport`` JSON outputs) are
put side by side: Recall/NDCG@10, target calls per list, accepted depth, ms per list and the ratios over Hugging Face
``generate`` and over our beam search at the same K; a speculative strict row whose Recall/NDCG differ from beam
search's is flagged. The summary is printed and written as JSON.

One pipeline per run directory (the deepest directory holding every output and the summary): it is locked
(``atspeed.run_lock``) before the first stage, whose own locks re-enter it. Exit codes: 0 done; 2 a bad pipeline file,
a summary path that cannot be written, or the run directory in use; 143 stopped by SIGTERM; else the failing stage's.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from atspeed.atomic import write_text_atomic
from atspeed.decoding.result import DecodeResult
from atspeed.errors import SIGTERM_EXIT, DataError
from atspeed.parsing import fail
from atspeed.pipeline_file import Pipeline, Stage, file_label, parse_pipeline, pipeline_args
from atspeed.pipeline_file import read_pipeline as read_pipeline  # the pipeline file, read as the command does
from atspeed.preflight import check_new_file
from atspeed.run_lock import lock_file, locked, sibling_lock_file
from atspeed.tables import text_table

log = logging.getLogger("atspeed.pipeline")
SUMMARY_K = 10
REFERENCES = {"hf_beam": "x_hf", "beam": "x_beam"}  # the decoders each row's speed is compared with, and the column


def run_stage(stage: Stage) -> None:
    """One stage in this process, as ``python -m atspeed <argv>``; its exit code travels on as ``SystemExit``."""
    from atspeed.cli import main  # the CLI imports Lightning and the models: only when a stage runs

    saved, sys.argv = sys.argv, sys.argv[:1]  # the stage's arguments are its own, not the pipeline's
    try:
        main(list(stage.argv))
    except SystemExit as err:
        if err.code not in (0, None):
            print(
                f"pipeline: stage {stage.name} stopped (exit {err.code}); rerun the pipeline to continue",
                file=sys.stderr,
            )
            raise
    finally:
        sys.argv = saved
        gc.collect()
    if not stage.output.exists():
        print(f"pipeline: stage {stage.name} ended without its output {stage.output}", file=sys.stderr)
        raise SystemExit(1)


def run_stages(stages: list[Stage]) -> list[dict]:
    """Run the stages whose output is missing, in order; what each did (name, command, output, ran, seconds)."""
    started, done = time.monotonic(), []
    for number, stage in enumerate(stages, 1):
        head = f"[{number}/{len(stages)}] {stage.name}"
        entry = {"name": stage.name, "command": stage.command, "output": str(stage.output), "ran": False}
        if stage.output.exists():
            log.info("%s: skipped, %s exists", head, stage.output)
        else:
            log.info("%s: %s", head, stage.command)
            clock = time.monotonic()
            run_stage(stage)
            entry |= {"ran": True, "seconds": time.monotonic() - clock}
            log.info("%s: done in %.0f s (%.0f s so far)", head, entry["seconds"], time.monotonic() - started)
        done.append(entry)
    return done


def run_pipeline(pipeline: Pipeline) -> dict:
    """Run the stages whose output is missing, in order; return (and write) the summary of the decode reports."""
    run_stages(pipeline.stages)
    summary = summarise(pipeline.stages)
    print(format_summary(summary))
    if pipeline.summary is not None:
        write_text_atomic(pipeline.summary, json.dumps(summary, indent=2) + "\n")
        log.info("wrote the summary to %s", pipeline.summary)
    return summary


def _metrics(report: dict) -> dict[str, float]:
    """The report's ranking metrics by bare name (``test/recall@10`` -> ``recall@10``)."""
    return {key.rsplit("/", 1)[-1]: value for key, value in report.get("metrics", {}).items()}


def _report_row(name: str, report: dict, k: int) -> dict:
    """One summary row; its speed is the report's own ``DecodeResult`` (``speed``), read back, never recomputed."""
    decode, metrics = report.get("decode", {}), _metrics(report)
    result = DecodeResult.from_speed(report.get("speed") or {})
    return {
        "stage": name,
        "decoder": report["decoder"],
        "draft": report.get("draft"),
        "K": report.get("settings", {}).get("num_beams"),
        "recall": metrics.get(f"recall@{k}"),
        "ndcg": metrics.get(f"ndcg@{k}"),
        "target_calls_per_list": decode.get("target_calls_per_list"),
        "accepted_depth": decode.get("mean_accepted_depth") if report.get("draft") else None,
        "ms_per_list": result.ms_per_list if result else None,
    }


def _common_k(reports: list[dict], preferred: int) -> int:
    """``preferred`` when every report has Recall@``preferred``, else the largest cut-off they all have."""
    cutoffs = [{int(key.split("@")[1]) for key in _metrics(r) if key.startswith("recall@")} for r in reports]
    common = set.intersection(*cutoffs) if cutoffs else set()
    return preferred if preferred in common or not common else max(common)


def decode_report(path: Path) -> dict | None:
    """The decode report (``DecodeReport``'s JSON) at ``path``, or None when the output is something else."""
    if path.suffix != ".json" or not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return report if isinstance(report, dict) and {"decoder", "decode", "metrics"} <= set(report) else None


def summarise(stages: list[Stage], k: int = SUMMARY_K) -> dict:
    """The decode stages' reports side by side, with speed ratios over ``hf_beam`` and ``beam`` (same K); Recall and
    NDCG at ``k`` (or the largest cut-off every report has); a decoder whose contract is "equals beam" is checked."""
    from atspeed.decoding.decoders import DECODERS  # torch: only when there are reports to summarise

    found = [(stage.name, report) for stage in stages if (report := decode_report(stage.output)) is not None]
    k = _common_k([report for _, report in found], k)
    rows = [_report_row(name, report, k) | {"speed": report.get("speed") or {}} for name, report in found]
    refs = {(r["decoder"], r["K"]): r for r in rows if r["decoder"] in REFERENCES}
    for row in rows:
        for name, field in REFERENCES.items():
            ref = DecodeResult.from_speed(refs[name, row["K"]]["speed"]) if (name, row["K"]) in refs else None
            row[field] = DecodeResult.from_speed(row["speed"]).speedup_over(ref) if row["ms_per_list"] else None
        beam, spec = refs.get(("beam", row["K"])), DECODERS.get(row["decoder"])
        checked = spec is not None and spec.equals == "beam" and beam is not None
        row["equals_beam"] = (row["recall"], row["ndcg"]) == (beam["recall"], beam["ndcg"]) if checked else None
    return {"k": k, "rows": [{key: v for key, v in row.items() if key != "speed"} for row in rows]}


def cell(value, fmt: str) -> str:
    """A table cell: ``-`` for None, yes/NO for booleans, else ``format(value, fmt)``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, fmt)


def format_summary(summary: dict) -> str:
    """A text table of the summary rows."""
    k = summary["k"]
    columns = (
        ("stage", "stage", "s"), ("decoder", "decoder", "s"), (f"R@{k}", "recall", ".4f"),
        (f"NDCG@{k}", "ndcg", ".4f"), ("calls/list", "target_calls_per_list", ".2f"),
        ("accepted", "accepted_depth", ".2f"), ("ms/list", "ms_per_list", ".1f"),
        ("x HF", "x_hf", ".2f"), ("x beam", "x_beam", ".2f"), ("= beam", "equals_beam", "s"),
    )  # fmt: skip
    rows = ([cell(row[key], fmt) for _, key, fmt in columns] for row in summary["rows"])
    return text_table([t for t, _, _ in columns], rows, left=2) + ("" if summary["rows"] else "\n(no decode reports)")


def check_outputs(pipeline: Pipeline, path: str | Path) -> None:
    """Before the first stage: the summary can be written (not found out after every stage ran)."""
    if pipeline.summary is not None:
        check_new_file(pipeline.summary, f"{path}: summary", overwrite=True)


def run_directory(pipeline: Pipeline, path: str | Path) -> tuple[Path, Path]:
    """(the pipeline's run directory, its lock file): the deepest directory that holds every stage's output and the
    summary; where they share none but the filesystem root, the lock file beside the pipeline file stands for it."""
    parents = [s.output.absolute().parent for s in pipeline.stages]
    if pipeline.summary is not None:
        parents.append(pipeline.summary.absolute().parent)
    common = Path(os.path.commonpath(parents))
    if common == Path(common.anchor):
        return Path(path), sibling_lock_file(path)
    return common, lock_file(common)


class Stopped(BaseException):
    """SIGTERM reached the pipeline outside a stage's Lightning loop (which stops itself at a step boundary)."""


def _stop(signum, frame) -> None:
    if signal.getsignal(signal.SIGTERM) is _stop:  # inside a loop, Lightning calls this from its own handler
        raise Stopped


def main(args: list[str]) -> None:
    """``python -m atspeed pipeline FILE`` (or ``--config FILE``): exit 2 on a bad pipeline file or one whose run
    directory is in use, 143 when stopped by SIGTERM, else the first failing stage's code."""
    from atspeed.cli import show_atspeed_logs

    show_atspeed_logs()
    label = file_label(pipeline_args(args))
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        with contextlib.ExitStack() as locks:
            try:
                pipeline = parse_pipeline(args)
                check_outputs(pipeline, label)
                directory, lock = run_directory(pipeline, label)
                locks.enter_context(locked(directory, f"pipeline {label}", lock))
            except DataError as err:
                raise fail(err) from None
            run_pipeline(pipeline)
    except Stopped:
        print("pipeline: stopped by SIGTERM; rerun the pipeline to continue", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
