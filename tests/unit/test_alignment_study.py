"""The alignment study's pure parts on hand-made rows: stage commands, row conversion, best marking, tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atspeed.bench.alignment_study import (
    Draft,
    StudyGrid,
    calls_table,
    check_sizes,
    last_validation,
    mark_best,
    missing_configs,
    plot_calls,
    results_table,
    size_tag,
    study_drafts,
    study_row,
    study_stages,
)
from atspeed.bench.decode_bench import add_speedups
from atspeed.bench.report import matplotlib_available

GRID = StudyGrid(
    ks=(1, 10), draft_beams=40, gamma=3, search_ks=(10,), search_draft_beams=(10, 40), search_gammas=(1, 3)
)
SECOND = {"hidden_size": 32, "num_layers": 2, "num_heads": 2}


def raw(decoder: str, k: int, n: int | None = None, gamma: int | None = None, ms: float = 10.0, **extra) -> dict:
    """A row as ``run_grid`` returns it (before ``add_speedups``)."""
    spec = decoder.startswith("spec")
    row = {
        "decoder": decoder, "K": k, "batch_size": 1, "N": n, "gamma": gamma, "lists": 4,
        "seconds_per_list": ms / 1e3, "seconds_per_list_repeats": [ms / 1e3], "lists_per_second": 1e3 / ms,
        "speedup_vs_hf": None, "speedup_vs_beam": None, "target_calls_per_list": 2.0 if spec else 4.0,
        "draft_calls_per_list": 3.0 if spec else 0.0, "tokens_per_target_call": 1.0,
        "mean_accepted_depth": 1.5 if spec else None, "accepted_histogram": [0, 1, 3, 0] if spec else None,
        "draft_fraction": 0.2, "verify_fraction": 0.7, "other_fraction": 0.1, "equals_hf": None,
        "hf_mismatched_lists": None, "recall_at_k": 0.5, "ndcg_at_k": 0.25,
    }  # fmt: skip
    return row | extra


def study_rows(drafts: dict[str, dict[tuple, float]]) -> list[dict]:
    """References at K = 1 and 10 (hf 40 ms, beam 20 ms), then per draft label {(decoder, K, N, gamma): ms}."""
    raws = [(None, raw(d, k, ms={"hf_beam": 40.0, "beam": 20.0}[d])) for k in (1, 10) for d in ("hf_beam", "beam")]
    for label, configs in drafts.items():
        draft = Draft(label, label.split("@")[0], Path(label))
        raws += [(draft, raw(d, k, n, g, ms)) for (d, k, n, g), ms in configs.items()]
    add_speedups([r for _, r in raws])
    rows = [study_row(r, d, 100 if d else None) for d, r in raws]
    mark_best(rows, GRID)
    return rows


def full(ms: dict[tuple, float] | None = None) -> dict[tuple, float]:
    """Every configuration of GRID for both decoders (10 ms unless ``ms`` says otherwise)."""
    configs = {}
    for d in ("spec_strict", "spec_relaxed"):
        configs[(d, 1, 40, 3)] = 10.0
        configs |= {(d, 10, n, g): 10.0 for n in (10, 40) for g in (1, 3)}
    return configs | (ms or {})


# -- stages ---------------------------------------------------------------------------------------------------


def test_drafts_and_labels() -> None:
    drafts = study_drafts(Path("runs/x"), ["sft", "atspeed_s", "sft"], ["atspeed_s"], SECOND)
    assert [d.label for d in drafts] == ["none", "sft", "atspeed_s", "atspeed_s@h32l2"]
    assert [d.loss for d in drafts] == ["none", "sft", "atspeed_s", "atspeed_s"]
    assert drafts[0].path == Path("runs/x/draft/hf")
    assert drafts[3].path == Path("runs/x/study/atspeed_s@h32l2/hf") and drafts[3].sizes == SECOND
    assert size_tag({"hidden_size": 8}) == "h8l2"  # ModelSpec's default layers


def test_stage_commands() -> None:
    runs, configs = Path("runs/x"), Path("configs/x")
    drafts = study_drafts(runs, ["sft"], ["atspeed_s"], SECOND)
    stages = study_stages(configs, runs, drafts, steps=5, stage_args=["--data.path", "d"])
    assert [s.name for s in stages] == ["target", "draft", "teacher", "align sft", "align atspeed_s@h32l2"]
    assert stages[0].argv == ["fit", "--config", "configs/x/target_sft.yaml", "--ckpt_path", "last", "--data.path", "d"]
    assert stages[1].output == Path("runs/x/draft/hf")
    assert stages[2].argv[:3] == ["predict", "--config", "configs/x/teacher.yaml"]
    assert stages[2].output == Path("runs/x/teacher/data/manifest.json")
    first, second = stages[3].argv, stages[4].argv
    assert first[:5] == ["fit", "--config", "configs/x/align.yaml", "--model.init_args.loss", "sft"]
    assert first[-2:] == ["--ckpt_path", "last"] and stages[3].output == Path("runs/x/study/sft/hf")

    def value(argv: list[str], key: str) -> str:  # the last occurrence wins in jsonargparse
        return argv[len(argv) - 1 - argv[::-1].index(key) + 1]

    out = "runs/x/study/atspeed_s@h32l2"
    assert value(second, "--trainer.default_root_dir") == out
    assert value(second, "--trainer.logger.init_args.save_dir") == out
    assert value(second, "--trainer.callbacks.init_args.dirpath") == f"{out}/hf"
    assert value(second, "--trainer.max_steps") == "5" and value(second, "--data.path") == "d"
    assert value(second, "--model.init_args.target") == "runs/x/target/hf"
    assert value(second, "--model.init_args.teacher_dir") == "runs/x/teacher/data"
    assert value(first, "--model.init_args.draft_init") == "runs/x/draft/hf"
    assert "--model.init_args.draft" not in first
    # the second size starts from scratch, even when --stage-args names a draft_init for the others
    stages = study_stages(configs, runs, drafts, stage_args=["--model.init_args.draft_init", "elsewhere"])
    second = stages[4].argv
    assert value(second, "--model.init_args.draft_init") == "null"
    assert json.loads(value(second, "--model.init_args.draft")) == SECOND
    assert "--trainer.max_steps" not in second


def test_missing_configs_only_for_stages_to_run(tmp_path) -> None:
    runs, configs = tmp_path / "runs", tmp_path / "configs"
    configs.mkdir()
    (configs / "align.yaml").write_text("{}")
    for done in ("target/hf", "draft/hf", "teacher/data/manifest.json"):
        (runs / done).parent.mkdir(parents=True, exist_ok=True)
        (runs / done).mkdir() if done.endswith("hf") else (runs / done).write_text("{}")
    stages = study_stages(configs, runs, study_drafts(runs, ["sft"], [], SECOND))
    assert missing_configs(stages) == []
    (runs / "draft" / "hf").rmdir()
    assert missing_configs(stages) == [str(configs / "draft_sft.yaml")]


def test_check_sizes() -> None:
    assert check_sizes(SECOND) == SECOND
    bad_sizes = [([], "JSON object"), ({"path": "x"}, "unknown keys"), ({"hidden_size": 6, "num_heads": 4}, "divide")]
    for bad, message in bad_sizes:
        with pytest.raises(ValueError, match=message):
            check_sizes(bad)


def test_last_validation_reads_the_last_value_of_each_column(tmp_path) -> None:
    for version, text in (
        (0, "step,train/loss,val/mean_accepted_depth,val/coverage@1\n3,1.0,,\n4,,0.5,0.25\n"),
        (1, "step,train/loss,val/mean_accepted_depth,val/coverage@1\n8,0.5,,\n8,,0.75,\n"),
    ):
        (tmp_path / "logs" / f"version_{version}").mkdir(parents=True)
        (tmp_path / "logs" / f"version_{version}" / "metrics.csv").write_text(text)
    assert last_validation(tmp_path) == {"val/mean_accepted_depth": 0.75, "val/coverage@1": 0.25}
    assert last_validation(tmp_path / "nothing") == {}


# -- grid and rows --------------------------------------------------------------------------------------------


def test_grid_configurations_and_checks() -> None:
    spec = GRID.speculative()
    assert len(spec) == len(set(spec)) == 2 * (1 + 4)  # (40, 3) at K = 10 once, though main and searched
    assert [c.k for c in spec] == sorted(c.k for c in spec)
    assert {(c.decoder, c.k) for c in GRID.references()} == {(d, k) for d in ("hf_beam", "beam") for k in (1, 10)}
    assert GRID.table_k == 10
    with pytest.raises(ValueError, match="--search-draft-beams"):
        StudyGrid((1,), 40, 3, (20,), (10,), (1,)).check(4)
    with pytest.raises(ValueError, match="--search-gammas"):
        StudyGrid((1,), 40, 3, (10,), (10,), (0,)).check(4)
    with pytest.raises(ValueError, match="--gamma:"):
        StudyGrid((1,), 40, 0, (10,), (10,), (1,)).check(4)
    with pytest.raises(ValueError, match="--ks"):
        StudyGrid((0,), 40, 3, (10,), (10,), (1,)).check(4)


def test_study_row_from_a_run_grid_row() -> None:
    r = raw("spec_strict", 10, 40, 3, ms=5.0, speedup_vs_beam=4.0, speedup_vs_hf=8.0)
    row = study_row(r, Draft("atspeed_s@h32l2", "atspeed_s", Path("d")), 1234)
    expected = {
        "loss": "atspeed_s", "draft": "atspeed_s@h32l2", "draft_parameters": 1234, "decoder": "spec_strict",
        "K": 10, "N": 40, "gamma": 3, "target_calls_per_list": 2.0, "accepted_depth": 1.5, "ms_per_list": 5.0,
        "x_beam": 4.0, "x_hf": 8.0, "recall": 0.5, "ndcg": 0.25, "accepted_histogram": [0, 1, 3, 0], "best": False,
    }  # fmt: skip
    assert {k: row[k] for k in expected} == expected
    ref = study_row(raw("beam", 10))
    assert (ref["loss"], ref["draft"], ref["draft_parameters"], ref["accepted_depth"]) == (None, None, None, None)


def test_best_is_the_fastest_searched_configuration_per_group() -> None:
    rows = study_rows({
        "none": full({("spec_strict", 10, 10, 1): 6.0, ("spec_relaxed", 10, 40, 3): 7.0}),
        "sft": full({("spec_strict", 1, 40, 3): 1.0}),  # faster, but at K = 1, which is not searched
    })  # fmt: skip
    best = [(r["draft"], r["decoder"], r["K"], r["N"], r["gamma"]) for r in rows if r["best"]]
    assert best[:2] == [("none", "spec_strict", 10, 10, 1), ("none", "spec_relaxed", 10, 40, 3)]
    groups = {(d, s, 10) for d in ("none", "sft") for s in ("spec_strict", "spec_relaxed")}
    assert len(best) == 4 and {b[:3] for b in best} == groups
    assert all(not r["best"] for r in rows if r["draft"] is None)
    beam = next(r for r in rows if r["decoder"] == "beam" and r["K"] == 10)
    assert beam["x_beam"] == 1.0 and beam["x_hf"] == 2.0
    fast = next(r for r in rows if r["best"] and r["draft"] == "none" and r["decoder"] == "spec_strict")
    assert fast["x_beam"] == pytest.approx(20 / 6) and fast["x_hf"] == pytest.approx(40 / 6)
    assert all(r["equals_beam"] is True for r in rows if r["decoder"] == "spec_strict")
    assert all(r["equals_beam"] is None for r in rows if r["decoder"] != "spec_strict")


def test_strict_rows_that_differ_from_beam_are_flagged() -> None:
    rows = [study_row(raw("beam", 3)), study_row(raw("spec_strict", 3, 6, 2, recall_at_k=0.4), Draft("a", "a", Path()))]
    mark_best(rows, StudyGrid((3,), 6, 2, (3,), (6,), (2,)))
    assert rows[1]["equals_beam"] is False and rows[1]["best"] is True


# -- tables and plot ------------------------------------------------------------------------------------------


def test_results_table() -> None:
    rows = study_rows({"none": full({("spec_strict", 10, 10, 1): 6.0}), "atspeed_s@h32l2": full()})
    text = results_table(rows, 10, 40, 3)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| draft"))
    assert "strict calls/list" in header and "relaxed best (N, γ)" in header and "strict x HF" in header
    none = next(line for line in lines if line.startswith("| none "))
    cells = [c.strip() for c in none.strip("|").split("|")]
    assert cells[:9] == ["none", "100", "2.00", "1.50", "10.00", "2.00", "4.00", "(10, 1)", "6.00"]
    assert any(line.startswith("| atspeed_s@h32l2 ") for line in lines)
    assert "- beam: 20.00 ms/list" in text and "- hf_beam: 40.00 ms/list" in text
    assert len({len(line.split("|")) for line in lines if line.startswith("|")}) == 1  # every line has every cell


def test_calls_table() -> None:
    rows = study_rows({"none": full(), "sft": full()})
    lines = calls_table(rows, 40, 3).splitlines()
    assert lines[2] == "| draft | strict K=1 | strict K=10 | relaxed K=1 | relaxed K=10 |"
    assert lines[4] == "| none | 2.00 | 2.00 | 2.00 | 2.00 |"
    assert lines[-1] == "| beam search | 4.00 | 4.00 | 4.00 | 4.00 |"
    assert len(lines) == 2 + 2 + 3  # title, blank, header, rule, two drafts and beam


@pytest.mark.skipif(not matplotlib_available(), reason="matplotlib is not installed")
def test_plot_calls(tmp_path) -> None:
    rows = study_rows({"none": full(), "sft": full()})
    assert plot_calls(tmp_path / "p.png", rows, 40, 3, "title")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]
