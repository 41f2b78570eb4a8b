"""Two-process CPU DDP (gloo) through the real command line: Lightning relaunches ``python -m atspeed`` per rank.
Training, and decoding (``predict``) into one predictions file and one report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atspeed.callbacks.predictions import merge_parts
from atspeed.cli import main
from tests.integration.tiny_data import decode_args, run_cli, tiny_args, write_processed


@pytest.mark.slow
def test_fit_with_two_cpu_processes(tmp_path) -> None:
    data = write_processed(tmp_path / "data")
    args = tiny_args(data, tmp_path / "run", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    done = run_cli("fit", args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "hf" / "atspeed.json").read_text())["global_step"] == 8
    assert "val/recall@3" in done.stderr + done.stdout


def _decoded(out: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (out / "p.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "r.json").read_text())


@pytest.mark.slow
def test_predict_with_two_cpu_processes_writes_the_single_process_results(exported, tmp_path) -> None:
    """23 requests (an odd count: 12 and 11 per process, last batches of 4 and 3) decoded by 2 processes: one
    predictions file in request order and one report, equal to a single-process run's; no part files left."""
    odd = ("--data.eval.test_users", "23")
    main(["predict", *decode_args(exported, tmp_path / "one", *odd)])
    two = tmp_path / "two"
    done = run_cli("predict", decode_args(exported, two, *odd, "--trainer.devices", "2", "--trainer.strategy", "ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(p.name for p in two.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "one").iterdir()), "the parts are merged and removed"
    (rows, report), (single_rows, single) = _decoded(two), _decoded(tmp_path / "one")
    assert len(rows) == 23 and [r["request"] for r in rows] == sorted(r["request"] for r in rows)
    assert [(r["request"], r["items"], r["targets"]) for r in rows] == [
        (r["request"], r["items"], r["targets"]) for r in single_rows
    ]
    scores = [s for r in rows for s in r["scores"]]  # other batch-mates: other padding, float rounding apart
    assert scores == pytest.approx([s for r in single_rows for s in r["scores"]], abs=1e-5)
    assert report["metrics"] == pytest.approx(single["metrics"], rel=1e-6)
    counts = {k: v for k, v in report["decode"].items() if not k.endswith("_seconds")}
    assert counts == {k: v for k, v in single["decode"].items() if not k.endswith("_seconds")}
    assert counts["lists"] == 23 and report["accepted_histogram"] == single["accepted_histogram"]
    speed = report["speed"]  # each process's first batch (8 lists) is its warm-up
    assert (speed["processes"], speed["timed_lists"], speed["warmup_excluded"]) == (2, 4 + 3, True)
    assert single["speed"]["processes"] == 1 and speed["ms_per_list"] > 0


def test_merged_parts_hold_each_request_once_in_request_order(tmp_path) -> None:
    """The rows of rank 0 (requests 0, 2, 4) and rank 1 (1, 3 and a repeat of 0, as a padding sampler gives) merge
    into one file in request order, the repeat dropped (rank 0's row kept), the parts removed."""
    parts = [tmp_path / "p.rank0.jsonl", tmp_path / "p.rank1.jsonl"]
    for part, rows in zip(parts, ([0, 2, 4], [1, 3, 0]), strict=True):
        part.write_text("".join(json.dumps({"request": r, "rank": part.name}) + "\n" for r in rows))
    assert merge_parts(parts, tmp_path / "p.jsonl") == 5
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["request"] for r in rows] == [0, 1, 2, 3, 4] and rows[0]["rank"] == "p.rank0.jsonl"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]
    with pytest.raises(FileNotFoundError, match=r"p\.rank0\.jsonl.*shares"):  # another node's part, on its own disk
        merge_parts(parts, tmp_path / "q.jsonl")
    assert not (tmp_path / "q.jsonl").exists()
