"""scripts/study_alignment.py end to end on the tiny fixtures: aligned drafts trained, every draft decoded, reruns
skip the training; strict decoding stays lossless with every draft."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from atspeed.bench.report import matplotlib_available
from tests.integration.tiny_data import load_script

ROOT = Path(__file__).resolve().parents[2]
SECOND = '{"hidden_size": 8, "num_layers": 1, "num_heads": 2, "max_positions": 128}'
LABELS = {"none", "sft", "atspeed_s", "atspeed_s@h8l1"}


def _script():
    return load_script("study_alignment")


def _exports(runs: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in sorted((runs / "study").glob("*/hf/*"))}


@pytest.fixture(scope="module")
def study(exported, teacher_data, tmp_path_factory) -> tuple[dict, Path, list[str]]:
    """One study on one thread: symlinked prerequisites (skipped), three tiny alignments, then decoding."""
    data, target, draft = exported
    root = tmp_path_factory.mktemp("study")
    runs, configs = root / "runs", root / "configs"
    for link, to in (("target/hf", target), ("draft/hf", draft), ("teacher/data", teacher_data)):
        (runs / link).parent.mkdir(parents=True, exist_ok=True)
        (runs / link).symlink_to(to.resolve(), target_is_directory=True)
    configs.mkdir()
    for name in ("align.yaml", "decoding.yaml"):  # align.yaml reads its decoding: block from the file beside it
        shutil.copy(ROOT / "configs" / "tiny" / name, configs / name)
    args = [
        "--configs", str(configs), "--runs", str(runs), f"--stage-args=--data.path {data}", "--steps", "4",
        "--losses", "sft", "atspeed_s", "--second-losses", "atspeed_s", "--second-draft", SECOND,
        "--ks", "1", "3", "--search-ks", "3", "--draft-beams", "6", "--search-draft-beams", "3", "6",
        "--gamma", "2", "--search-gammas", "1", "2", "--requests", "4",
        "--source", "processed", "--data", str(data), "--index-key-offset", "0",
        "--out", str(root / "study.json"), "--plot", str(root / "study.png"),
    ]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _script().main(args) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((root / "study.json").read_text()), root, args


def test_rows_cover_every_draft_and_configuration(study) -> None:
    report, _, _ = study
    rows = report["rows"]
    assert {r["draft"] for r in rows if r["draft"]} == LABELS
    assert {r["loss"] for r in rows} == {None, "none", "sft", "atspeed_s"}
    refs = [r for r in rows if r["loss"] is None]
    assert sorted((r["decoder"], r["K"]) for r in refs) == [("beam", 1), ("beam", 3), ("hf_beam", 1), ("hf_beam", 3)]
    for label in LABELS:
        mine = {(r["decoder"], r["K"], r["N"], r["gamma"]) for r in rows if r["draft"] == label}
        searched = {(d, 3, n, g) for d in ("spec_strict", "spec_relaxed") for n in (3, 6) for g in (1, 2)}
        assert mine == {(d, 1, 6, 2) for d in ("spec_strict", "spec_relaxed")} | searched
    for r in rows:
        assert r["ms_per_list"] > 0 and r["x_beam"] > 0 and r["x_hf"] > 0 and r["target_calls_per_list"] >= 1
        assert (r["draft_parameters"] is None) == (r["draft"] is None)
    assert all(r["x_beam"] == 1.0 for r in refs if r["decoder"] == "beam")


def test_strict_is_lossless_with_every_draft(study) -> None:
    rows = study[0]["rows"]
    beam = {r["K"]: r for r in rows if r["decoder"] == "beam"}
    strict = [r for r in rows if r["decoder"] == "spec_strict"]
    assert len(strict) == 4 * 5
    for r in strict:
        assert (r["recall"], r["ndcg"]) == (beam[r["K"]]["recall"], beam[r["K"]]["ndcg"]), r
        assert r["equals_beam"] is True


def test_one_best_per_draft_decoder_and_searched_k(study) -> None:
    rows = study[0]["rows"]
    best = [(r["draft"], r["decoder"], r["K"]) for r in rows if r["best"]]
    assert sorted(best) == sorted((d, s, 3) for d in LABELS for s in ("spec_strict", "spec_relaxed"))


def test_header_alignment_metrics_and_plot(study) -> None:
    report, root, _ = study
    assert report["benchmark"] == "alignment_study" and "--search-ks 3" in report["command"]
    assert report["machine"]["load_average_before"] and report["machine"]["load_average_after"]
    assert report["models"]["levels"] == 2 and set(report["models"]["drafts"]) == LABELS
    assert report["settings"]["requests"] == 4 and report["total_seconds"] > 0
    assert [s["ran"] for s in report["stages"]] == [False, False, False, True, True, True]
    assert set(report["alignment"]) == LABELS - {"none"}
    assert all("val/mean_accepted_depth" in metrics for metrics in report["alignment"].values())
    for label, start in (("atspeed_s", str(root / "runs" / "draft" / "hf")), ("atspeed_s@h8l1", None)):
        checkpoint = torch.load(root / "runs" / "study" / label / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["hyper_parameters"]["draft_init"] == start  # the second size is trained from scratch
    if matplotlib_available():
        assert (root / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_training(study) -> None:
    _, root, args = study
    runs = root / "runs"
    before = _exports(runs)
    assert len(before) > 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _script().main(args) == 0
    finally:
        torch.set_num_threads(threads)
    assert _exports(runs) == before
    report = json.loads((root / "study.json").read_text())
    assert not any(s["ran"] for s in report["stages"])
