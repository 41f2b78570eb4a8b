"""Predict results reach every logger (W&B tables included), compare_beam measures the speed ratio over beam search in
the same run, and the decoding benchmark logs its table and plot to an offline W&B run."""

from __future__ import annotations

import csv
import fnmatch
import json
import math
from pathlib import Path

import pytest
import torch

from atspeed.bench.report import matplotlib_available
from atspeed.cli import main
from atspeed.decoding.options import DecodeOptions
from atspeed.modules.recommend import Recommender
from atspeed.wandb_log import table_data, wandb_mode
from tests.integration.tiny_data import ROOT, decode_args, load_script

wandb = pytest.importorskip("wandb")
WANDB_CONFIG = str(ROOT / "configs/loggers/wandb.yaml")
SPEED = {"decode/ms_per_list", "decode/beam_ms_per_list", "decode/ratio_over_beam"}


@pytest.fixture
def offline(monkeypatch):
    """W&B offline (WandbLogger(offline=True) rewrites WANDB_MODE: restored after), every run finished after."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield
    wandb.finish()


def _predict(exported, out: Path, *extra: str) -> tuple[Recommender, list[dict], dict]:
    cli = main(["predict", *decode_args(exported, out, *extra)])
    rows = [json.loads(line) for line in (out / "p.jsonl").read_text().splitlines()]
    return cli.model, rows, json.loads((out / "r.json").read_text())


def _offline_run(save_dir: Path) -> Path:
    (run,) = (save_dir / "wandb").glob("offline-run-*")
    return run


def _tables(run: Path) -> dict[str, dict]:
    """``files/media/table/<key>_<step>_<hash>.table.json`` by key (the part before ``_<step>``)."""
    found = {}
    for path in (run / "files" / "media" / "table").rglob("*.table.json"):
        key = path.relative_to(run / "files" / "media" / "table").as_posix().rsplit("_", 2)[0]
        found[key] = json.loads(path.read_text())
    return found


def test_compare_beam_reports_the_ratio_and_logs_wandb_tables(exported, tmp_path, offline) -> None:
    save_dir = tmp_path / "wandb"
    extra = ["--config", WANDB_CONFIG, "--trainer.logger.init_args.save_dir", str(save_dir),
             "--model.init_args.compare_beam", "true"]  # fmt: skip
    model, _, report = _predict(exported, tmp_path / "compare", *extra)
    logged = set(model.logger.experiment.summary.keys())  # what the run holds (offline runs write no summary file)
    wandb.finish()
    speed = report["speed"]
    assert speed["timed_lists"] == 16 and speed["warmup_excluded"] is True  # 24 requests in batches of 8: first untimed
    for key in ("ms_per_list", "beam_ms_per_list", "ratio_over_beam"):
        assert math.isfinite(speed[key]) and speed[key] > 0, key
    assert speed["ratio_over_beam"] == pytest.approx(speed["beam_ms_per_list"] / speed["ms_per_list"])

    summary = model.summary_metrics()
    expected = set(report["metrics"]) | {f"decode/{key}" for key in report["decode"]} | SPEED
    assert set(summary) == expected
    assert {"test/recall@3", "test/ndcg@1", "decode/target_calls_per_list", "decode/mean_accepted_depth"} <= expected
    assert summary["decode/ratio_over_beam"] == speed["ratio_over_beam"]
    assert summary["decode/lists"] == 24 and summary["test/recall@3"] == report["metrics"]["test/recall@3"]
    assert all(type(v) is float for v in summary.values())
    # what the sweep runner checks a sweep's metric against, before any run, is what the stage logs
    assert all(any(fnmatch.fnmatchcase(key, p) for p in Recommender.LOGGED_METRICS) for key in summary), summary
    assert len(Recommender.LOGGED_METRICS) == 2 + len(expected) - len(report["metrics"])

    run = _offline_run(save_dir)
    tables = _tables(run)
    assert set(tables) == {"decode/stats", "decode/accepted_depths"}
    stats = dict(zip(tables["decode/stats"]["columns"], tables["decode/stats"]["data"][0], strict=True))
    assert (stats["decoder"], stats["K"], stats["N"], stats["gamma"]) == ("spec_strict", 3, 6, 2)
    assert stats["decode/ratio_over_beam"] == pytest.approx(speed["ratio_over_beam"])
    depths = tables["decode/accepted_depths"]
    assert depths["columns"] == ["depth", "calls"]
    assert [row[1] for row in depths["data"]] == report["accepted_histogram"]
    assert [row[0] for row in depths["data"]] == list(range(3))
    assert set(summary) | {"decode/stats", "decode/accepted_depths"} <= logged


def test_compare_beam_leaves_strict_lists_alone_and_metrics_reach_every_logger(exported, tmp_path) -> None:
    """A strict speculative decode returns the same lists with and without the beam-search comparison; without it the
    speed has no beam entries, and the summary reaches a CSV logger as well."""
    csv_logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "csv")}}
    model, plain, report = _predict(exported, tmp_path / "plain", "--trainer.logger", json.dumps(csv_logger))
    _, compared, _ = _predict(exported, tmp_path / "compared", "--model.init_args.compare_beam", "true")
    assert [r["items"] for r in compared] == [r["items"] for r in plain]
    assert [r["scores"] for r in compared] == [r["scores"] for r in plain]
    assert set(report["speed"]) == {"ms_per_list", "seconds", "timed_lists", "warmup_excluded", "processes"}
    summary = model.summary_metrics()
    assert "decode/ms_per_list" in summary and not SPEED - {"decode/ms_per_list"} & set(summary)
    (metrics_csv,) = (tmp_path / "csv").rglob("metrics.csv")
    with metrics_csv.open() as handle:
        (logged,) = list(csv.DictReader(handle))
    assert {key: float(value) for key, value in logged.items() if key != "step"} == pytest.approx(summary)


def test_summary_metrics_is_empty_before_predict(exported) -> None:
    _, target, draft = exported
    assert (
        Recommender(
            str(target), str(draft), DecodeOptions(num_beams=3, draft_beams=6), eval_ks=[1, 3]
        ).summary_metrics()
        == {}
    )


def test_wandb_mode_follows_the_environment_then_the_api_key(monkeypatch) -> None:
    assert wandb_mode({"WANDB_MODE": "disabled", "WANDB_API_KEY": "x" * 40}) == "disabled"
    assert wandb_mode({"WANDB_API_KEY": "x" * 40}) == "online"
    monkeypatch.setattr("atspeed.wandb_log.api_key_configured", lambda env: False)
    assert wandb_mode({}) == "offline"


def test_table_data_makes_every_column_one_kind() -> None:
    rows = [{"budget": None, "K": 1, "ms": 2}, {"budget": 20, "K": 3, "ms": 2.5, "hist": [1, 2]},
            {"budget": "auto", "K": 5, "ms": 1.0}]  # fmt: skip
    columns, data = table_data(rows)
    assert columns == ["budget", "K", "ms", "hist"]
    assert [row[0] for row in data] == [None, "20", "auto"]
    assert [row[1:3] for row in data] == [[1, 2], [3, 2.5], [5, 1.0]]
    assert [row[3] for row in data] == [None, "[1, 2]", None]


def test_bench_logs_its_table_and_plot_to_an_offline_run(tmp_path, offline) -> None:
    out = tmp_path / "bench"
    args = ["--preset", "smoke", "--decoders", "beam", "spec_strict", "--ks", "2", "--batch-sizes", "1",
            "--requests", "2", "--draft-beams", "4", "--gammas", "2", "--budgets", "none", "auto", "--repeats", "1",
            "--warmup", "0", "--cost-repeats", "0", "--out", str(out / "bench.json"), "--plot", str(out / "bench.png"),
            "--wandb-project", "atspeed-test", "--wandb-dir", str(out / "wandb")]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert load_script("bench_decode").main(args) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((out / "bench.json").read_text())
    run = _offline_run(out / "wandb")
    table = _tables(run)["bench/rows"]
    assert len(table["data"]) == len(report["rows"]) == 3
    decoders = [row[table["columns"].index("decoder")] for row in table["data"]]
    assert decoders == [row["decoder"] for row in report["rows"]]
    assert [row[table["columns"].index("budget")] for row in table["data"]] == [None, None, "auto"]
    images = list((run / "files" / "media" / "images").rglob("*.png"))
    if matplotlib_available():
        assert len(images) == 1 and images[0].read_bytes() == (out / "bench.png").read_bytes()
    else:
        assert images == []


def test_the_config_logger_is_offline_unless_wandb_would_log_online(tmp_path, monkeypatch) -> None:
    """configs/loggers/wandb.yaml's logger: offline without WANDB_MODE and without an API key, online with a key,
    WANDB_MODE first, an explicit offline flag above all."""
    from atspeed.wandb_log import WandbLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert WandbLogger(save_dir=str(tmp_path))._offline is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert WandbLogger(save_dir=str(tmp_path))._offline is False
    assert WandbLogger(save_dir=str(tmp_path), offline=True)._offline is True
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert WandbLogger(save_dir=str(tmp_path))._offline is True
