"""scripts/bench_decode.py: the smoke preset times every decoder, writes the JSON and the plot; bad flags fail fast."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from atspeed.bench.report import matplotlib_available
from tests.integration.tiny_data import load_script

ROOT = Path(__file__).resolve().parents[2]
DECODERS = {"hf_beam", "beam", "spec_strict", "spec_relaxed", "spec_relaxed_exact", "beam_sample", "beam_sample_keyed",
            "spec_keyed"}  # fmt: skip


def _script():
    return load_script("bench_decode")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, Path, list[str]]:
    """One smoke run on one thread: the tiny models gain nothing from two, and lose a lot when the cores are busy."""
    out = tmp_path_factory.mktemp("bench")
    args = ["--preset", "smoke", "--self-draft", "--out", str(out / "bench.json"), "--plot", str(out / "bench.png")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _script().main(args) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "bench.json").read_text()), out / "bench.png", args


def test_smoke_rows_cover_every_decoder_and_configuration(smoke) -> None:
    report, _, _ = smoke
    rows = report["rows"]
    assert {r["decoder"] for r in rows} == DECODERS
    grid = {(r["K"], r["batch_size"]) for r in rows}
    assert grid == {(k, b) for k in (1, 3, 5) for b in (1, 4)}
    for k, b in grid:
        here = [r for r in rows if (r["K"], r["batch_size"]) == (k, b)]
        assert {r["decoder"] for r in here} == DECODERS
        assert all(r["N"] >= k and r["gamma"] >= 1 for r in here if r["decoder"].startswith("spec"))
    for r in rows:
        for key in ("seconds_per_list", "lists_per_second", "speedup_vs_hf", "speedup_vs_beam"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["lists"] == {1: 4, 4: 8}[r["batch_size"]]
        assert len(r["seconds_per_list_repeats"]) == 2
        assert r["target_calls_per_list"] >= 1
        assert 0 <= r["recall_at_k"] <= 1 and 0 <= r["ndcg_at_k"] <= 1


def test_smoke_reports_the_forward_cost_model(smoke) -> None:
    """Target and draft cost per forward, from 1 token to the largest tree K + gamma x N of the grid (5 + 3 x 6)."""
    costs = smoke[0]["cost_model"]
    sizes = ["prefill", "1", "3", "5", "6", "13", "15", "17", "19", "21", "23"]
    assert costs["prompt_tokens"] > 0 and set(costs["ms"]) == {"target", "draft"}
    for row in costs["ms"].values():
        assert list(row) == sizes and all(math.isfinite(v) and v > 0 for v in row.values())
    for row in smoke[0]["rows"]:  # the prediction covers batch-1 rows of every decoder but HF generate
        predicted = row["predicted_ms_per_list"]
        covered = row["batch_size"] == 1 and row["decoder"] != "hf_beam"
        assert (predicted is not None and math.isfinite(predicted) and predicted > 0) if covered else predicted is None


def test_strict_and_beam_lists_equal_hf_generate(smoke) -> None:
    rows = smoke[0]["rows"]
    for r in rows:
        if r["decoder"] in ("beam", "spec_strict"):
            assert r["equals_hf"] is True and r["hf_mismatched_lists"] == 0, r
        else:
            assert r["equals_hf"] is None
    refs = [r for r in rows if r["decoder"] in ("hf_beam", "beam")]
    assert all(r["mean_accepted_depth"] is None and r["accepted_histogram"] is None for r in refs)
    for r in rows:
        if r["decoder"].startswith("spec"):
            assert len(r["accepted_histogram"]) == r["gamma"] + 1
            # a whole tree verifies once per list at least; auto may decode whole lists as beam search instead
            assert sum(r["accepted_histogram"]) >= (r["lists"] if r["budget"] is None else 0)
            assert 0 <= r["mean_accepted_depth"] <= r["gamma"]


def test_smoke_rows_cover_budgets_and_the_perfect_draft(smoke) -> None:
    """Every speculative (N, gamma) runs with the whole tree and with budget auto; spec_strict with the target as its
    own draft (N = K, gamma = L) closes each group, equals HF generate and needs fewer target calls than beam search."""
    rows = smoke[0]["rows"]
    levels = smoke[0]["models"]["levels"]
    for k, b in {(r["K"], r["batch_size"]) for r in rows}:
        here = [r for r in rows if (r["K"], r["batch_size"]) == (k, b)]
        spec = [r for r in here if r["decoder"].startswith("spec") and r["draft"] == "draft"]
        assert {r["budget"] for r in spec} == {None, "auto"}
        assert all(0 <= r["verified_nodes_per_call"] <= r["gamma"] * r["N"] for r in spec)
        full = [r for r in spec if r["budget"] is None]
        assert all(r["verified_nodes_per_call"] > 0 for r in full)
        (own,) = [r for r in here if r["draft"] == "target"]
        (beam,) = [r for r in here if r["decoder"] == "beam"]
        assert own["decoder"] == "spec_strict" and (own["N"], own["gamma"]) == (k, levels) and own["equals_hf"]
        assert own["target_calls_per_list"] < beam["target_calls_per_list"] == levels


def test_header_and_plot(smoke) -> None:
    report, png, _ = smoke
    assert report["preset"] == "smoke" and "--preset smoke" in report["command"]
    assert report["machine"]["torch_threads"] >= 1 and report["machine"]["torch"]
    assert report["models"]["target_parameters"] > report["models"]["draft_parameters"] > 0
    assert report["settings"]["requests"] == {"1": 4, "4": 8}
    if matplotlib_available():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flags_round_trip_through_a_config_file(tmp_path, capsys) -> None:
    """jsonargparse, as the CLI: --print_config writes the flags as YAML and --config reads them back."""
    script = _script()
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--preset", "smoke", "--ks", "1", "3", "--budgets", "none", "auto", "7", "--print_config"])
    assert exit_info.value.code == 0
    path = tmp_path / "bench.yaml"
    path.write_text(capsys.readouterr().out)
    p = script.parser()
    args = script.resolve(p, p.parse_args(["--config", str(path)]))
    assert (args.preset, args.ks, args.budgets, args.batch_sizes) == ("smoke", [1, 3], [None, "auto", 7], [1, 4])


def test_wandb_flags_round_trip_through_a_config_file(tmp_path, capsys) -> None:
    script = _script()
    with pytest.raises(SystemExit) as exit_info:
        script.main(
            ["--preset", "smoke", "--wandb-project", "p", "--wandb-entity", "e", "--wandb-dir", "w", "--print_config"]
        )
    assert exit_info.value.code == 0
    path = tmp_path / "bench.yaml"
    path.write_text(capsys.readouterr().out)
    p = script.parser()
    args = script.resolve(p, p.parse_args(["--config", str(path)]))
    assert (args.wandb_project, args.wandb_entity, Path(args.wandb_dir)) == ("p", "e", Path("w"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--gammas", "0"], "--gammas"),
        (["--budgets", "-1"], "--budgets"),
        (["--ks", "20", "--draft-beams", "10"], "--draft-beams"),
        (["--requests", "5", "--batch-sizes", "4"], "--requests"),
        (["--wandb-entity", "me"], "--wandb-entity: give --wandb-project too"),
        (["--preset", "full", "--target", "/nonexistent/target"], "--target: directory not found"),
        (["--preset", "full", "--target", ".", "--draft", "/nonexistent/draft"], "--draft: directory not found"),
        (["--preset", "full", "--target", ".", "--draft", ".", "--data", "/nonexistent/data"], "--data: not found"),
    ],
)
def test_bad_flags_fail_before_loading(capsys, extra, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _script().main(["--preset", "smoke", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
