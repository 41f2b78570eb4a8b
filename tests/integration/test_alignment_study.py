"""scripts/study_alignment.py end to end on the tiny fixtures: 2 losses x 2 seeds aligned (atspeed_s_authors with the
authors' settings), every draft decoded with every studied decoder, the references once; a rerun trains nothing and
decodes nothing; rows lost from the partial file (a killed run) are decoded again, and only they."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from atspeed.bench.report import matplotlib_available
from atspeed.bench.study_decode import default_decoders, default_references
from tests.integration.tiny_data import load_script

ROOT = Path(__file__).resolve().parents[2]
LABELS = {"none", "sft/seed0", "sft/seed1", "atspeed_s_authors/seed0", "atspeed_s_authors/seed1"}


def _run(args: list[str]) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert load_script("study_alignment").main(args) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(Path(args[args.index("--out") + 1]).read_text())


def _exports(runs: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in sorted((runs / "study").glob("*/seed*/hf/*"))}


@pytest.fixture(scope="module")
def study(exported, teacher_data, tmp_path_factory) -> tuple[dict, Path, list[str]]:
    """One study: symlinked prerequisites (skipped), four tiny alignments, then decoding."""
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
        "--configs", str(configs), "--runs", str(runs), f"--stage-args=--data.source.init_args.path {data}",
        "--steps", "2",
        "--losses", "sft", "atspeed_s_authors", "--seeds", "0", "1", "--sliding-losses", "--on-policy-losses",
        "--large-losses", "--authors-top-k", "2", "--ks", "1", "3", "--draft-beams", "6", "--gamma", "2",
        "--requests", "4", "--source", "processed", "--data", str(data), "--index-key-offset", "0",
        "--out", str(root / "study.json"), "--plot", str(root / "study.png"),
    ]  # fmt: skip
    return _run(args), root, args


def test_rows_carry_seed_and_requests_for_every_draft_decoder_and_k(study) -> None:
    report, root, _ = study
    rows = report["rows"]
    decoders, references = default_decoders(), default_references()
    assert {"spec_strict", "spec_relaxed", "spec_relaxed_exact"} <= set(decoders)
    assert {"beam", "beam_sample"} <= set(references)
    refs = [r for r in rows if r["draft"] is None]
    assert sorted((r["decoder"], r["K"]) for r in refs) == sorted((d, k) for d in references for k in (1, 3))
    for label in LABELS:
        mine = [r for r in rows if r["draft"] == label]
        assert sorted((r["decoder"], r["K"], r["N"], r["gamma"]) for r in mine) == sorted(
            (d, k, 6, 2) for d in decoders for k in (1, 3)
        )
        assert {r["seed"] for r in mine} == ({None} if label == "none" else {int(label[-1])})
    for r in rows:
        assert r["requests"] == 4 and r["target_calls_per_list"] >= 1 and 0 <= r["recall"] <= 1
        assert r["metric_at"] == min(10, r["K"]) and r["recall_se"] is not None
    beam = {r["K"]: r for r in refs if r["decoder"] == "beam"}
    for r in rows:
        if r["decoder"] == "spec_strict":  # strict decoding is lossless with every draft
            assert (r["recall"], r["ndcg"]) == (beam[r["K"]]["recall"], beam[r["K"]]["ndcg"])
    # each seed trained its own draft, from the SFT draft, with its seed and the authors' settings
    for label in LABELS - {"none"}:
        group, seed = label.split("/seed")
        checkpoint = torch.load(root / "runs" / "study" / group / f"seed{seed}" / "checkpoints" / "last.ckpt",
                                weights_only=True)  # fmt: skip
        hp = checkpoint["hyper_parameters"]
        assert hp["seed"] == int(seed) and hp["draft_init"] == str(root / "runs" / "draft" / "hf")
        assert hp["ce_on"] == ("all" if group == "atspeed_s_authors" else "item")
    weights = [
        torch.load(root / "runs" / "study" / "sft" / f"seed{s}" / "checkpoints" / "last.ckpt", weights_only=True)
        for s in (0, 1)
    ]
    assert any(
        not torch.equal(weights[0]["state_dict"][k], weights[1]["state_dict"][k]) for k in weights[0]["state_dict"]
    )
    assert set(report["alignment"]) == LABELS - {"none"}
    if matplotlib_available():
        assert (root / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_trains_nothing_and_decodes_nothing_then_resumes_lost_rows(study) -> None:
    first, root, args = study
    before = _exports(root / "runs")
    assert len(before) >= 4
    again = _run(args)
    assert not any(s["ran"] for s in again["stages"]) and again["rows_decoded_by_this_run"] == 0
    assert _exports(root / "runs") == before
    assert again["rows"] == first["rows"]
    partial = root / "study.partial.json"
    kept = json.loads(partial.read_text())["rows"][:-3]  # as if killed three rows before the end
    partial.write_text(json.dumps({"rows": kept}))
    resumed = _run(args)
    assert resumed["rows_decoded_by_this_run"] == 3 and not any(s["ran"] for s in resumed["stages"])
    assert len(resumed["rows"]) == len(first["rows"])
    counts = [(r["draft"], r["decoder"], r["K"], r["target_calls_per_list"]) for r in resumed["rows"]]
    assert counts == [(r["draft"], r["decoder"], r["K"], r["target_calls_per_list"]) for r in first["rows"]]
