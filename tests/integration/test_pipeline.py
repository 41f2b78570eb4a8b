"""``python -m atspeed pipeline``: the whole pipeline on tiny configs, an interruption, and the rerun that continues."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from atspeed.decoding.output import DecodeStats
from atspeed.modules.decode_tally import BatchTally, merged_stats, speed_summary
from atspeed.pipeline import Stage, read_pipeline, run_pipeline, summarise
from tests.integration.tiny_data import align_args, decode_args, run_cli, teacher_args, tiny_args, write_processed

DRAFT_SIZES = ["--model.init_args.model.hidden_size", "8", "--model.init_args.model.num_layers", "1"]


def tiny_pipeline(root: Path, bad_align: bool = False) -> Path:
    """A pipeline file for the tiny configs: SFT target and draft, teacher data, alignment, four decodes."""
    data = write_processed(root / "data")
    target, draft, aligned = root / "target" / "hf", root / "draft" / "hf", root / "align" / "hf"
    exported = (data, target, draft)
    often = ["--progress.every_seconds", "0.001"]  # a progress line at (almost) every batch: stderr is not a terminal
    align = align_args(exported, root / "teacher" / "data", root / "align", "--ckpt_path", "last", *often)
    if bad_align:
        align += ["--model.init_args.alpha", "2"]

    def decode(name: str, decoder: str, *extra: str) -> dict:
        out = root / name
        run = ["predict", *decode_args(exported, out, "--model.init_args.decoding.decoder", decoder, *extra)]
        return {"name": name, "run": run, "output": str(out / "r.json")}

    stages = [
        {"name": "target", "run": ["fit", *tiny_args(data, root / "target"), "--ckpt_path", "last"],
         "output": str(target)},
        {"name": "draft", "run": ["fit", *tiny_args(data, root / "draft"), *DRAFT_SIZES, "--ckpt_path", "last"],
         "output": str(draft)},
        {"name": "teacher", "run": ["predict", *teacher_args(exported, root / "teacher")],
         "output": str(root / "teacher" / "data" / "manifest.json")},
        {"name": "align", "run": ["fit", *align], "output": str(aligned)},
        decode("decode_hf", "hf_beam"),
        decode("decode_beam", "beam", *often),
        decode("spec_sft_draft", "spec_strict"),
        decode("spec_aligned", "spec_strict", "--model.init_args.draft", str(aligned)),
    ]  # fmt: skip
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": stages, "summary": str(root / "summary.json")}))
    return path


def test_interrupted_pipeline_continues_and_summarises(tmp_path) -> None:
    """A stage that fails stops the pipeline with its exit code and leaves the earlier outputs; the rerun skips the
    finished stages (their outputs untouched), runs the rest, and the summary puts the decodes side by side."""
    bad = read_pipeline(tiny_pipeline(tmp_path, bad_align=True))
    with pytest.raises(SystemExit) as stopped:
        run_pipeline(bad)
    assert stopped.value.code == 2
    done = {s.name: s.output for s in bad.stages[:3]}
    assert all(path.exists() for path in done.values())
    assert not any(s.output.exists() for s in bad.stages[3:]) and not (tmp_path / "summary.json").exists()
    stamps = {name: path.stat().st_mtime_ns for name, path in done.items()}

    rerun = run_cli("pipeline", [str(tiny_pipeline(tmp_path))])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name in done:
        assert f"{name}: skipped" in rerun.stderr
    assert {name: path.stat().st_mtime_ns for name, path in done.items()} == stamps
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["k"] == 3  # the tiny decodes report Recall@{1, 3}: the largest common cut-off
    rows = {row["stage"]: row for row in summary["rows"]}
    assert list(rows) == ["decode_hf", "decode_beam", "spec_sft_draft", "spec_aligned"]
    beam = rows["decode_beam"]
    for name in ("spec_sft_draft", "spec_aligned"):
        row = rows[name]
        assert row["equals_beam"] is True and row["recall"] == beam["recall"] is not None
        assert row["x_beam"] > 0 and row["x_hf"] > 0 and row["accepted_depth"] >= 0
        assert 1 <= row["target_calls_per_list"] <= beam["target_calls_per_list"]
    assert beam["x_beam"] == pytest.approx(1.0) and beam["accepted_depth"] is None
    for stage in read_pipeline(tmp_path / "pipeline.yaml").stages[4:]:  # one definition of ms per list
        assert rows[stage.name]["ms_per_list"] == json.loads(stage.output.read_text())["speed"]["ms_per_list"]
    assert "spec_aligned" in rerun.stdout and "calls/list" in rerun.stdout
    assert "fit: step 8 of 8" in rerun.stderr and "predict: batch" in rerun.stderr  # progress in a log

    again = run_cli("pipeline", [str(tmp_path / "pipeline.yaml")])
    assert again.returncode == 0 and again.stderr.count("skipped") == len(bad.stages)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def _report(path: Path, decoder: str, seconds: list[float], recall: float) -> dict:
    """A predict report as ``Recommender`` writes it, from batches of 4 requests decoded in ``seconds`` each (the
    first batch the warm-up) with 1 s per stage."""
    batches = []
    for i, wall in enumerate(seconds):
        ids = torch.arange(4 * i, 4 * i + 4)
        stats = DecodeStats(ids * 0 + 2, ids * 0, ids * 0, 1.0, 1.0, 1.0)
        batches.append(BatchTally(ids, stats, {"decoder": wall}))
    merged = merged_stats([batches])
    report = {"decoder": decoder, "draft": None, "settings": {"num_beams": 3}, "metrics": {"test/recall@3": recall,
              "test/ndcg@3": recall / 2}, "decode": merged.summary(2), "speed": speed_summary([batches])}  # fmt: skip
    path.write_text(json.dumps(report))
    return report


def test_the_summary_reads_each_reports_ms_per_list(tmp_path) -> None:
    """The pipeline summary's ms per list and ratios are the reports' own ``DecodeResult`` (the warm-up batch left
    out), not recomputed from the stage seconds; a decoder whose contract is "equals beam" is checked against beam."""
    specs = {
        "hf": ("hf_beam", [9.0, 4.0, 4.0], 0.5),
        "beam": ("beam", [5.0, 2.0, 2.0], 0.5),
        "strict": ("spec_strict", [3.0, 1.0, 1.0], 0.5),
        "relaxed": ("spec_relaxed", [3.0, 0.5, 0.5], 0.25),
    }
    reports = {name: _report(tmp_path / f"{name}.json", *spec) for name, spec in specs.items()}
    summary = summarise([Stage(name, ["predict"], tmp_path / f"{name}.json") for name in specs])
    rows = {row["stage"]: row for row in summary["rows"]}
    assert (
        {name: row["ms_per_list"] for name, row in rows.items()}
        == {name: report["speed"]["ms_per_list"] for name, report in reports.items()}
        == {"hf": 1000.0, "beam": 500.0, "strict": 250.0, "relaxed": 125.0}
    )
    assert (rows["strict"]["x_beam"], rows["strict"]["x_hf"], rows["relaxed"]["x_beam"]) == (2.0, 4.0, 4.0)
    assert [rows[name]["equals_beam"] for name in specs] == [True, None, True, None]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("stages: []", "stages: expected a non-empty list"),
        ("stages:\n  - {name: a, run: fit}", "stages: the following arguments are required: output"),
        ("stages:\n  - {name: a, run: fit, output: o, x: 1}", "stages: Option 'x' is not accepted"),
        ("stages:\n  - {name: a, run: train --x 1, output: o}", "stages[0].run: must start with one of fit"),
        ("stages:\n  - {name: a, run: fit, output: o}\n  - {name: a, run: fit, output: p}", "stages[1].name"),
        ("stages:\n  - {name: a, run: fit, output: o}\nextra: 1", "Option 'extra' is not accepted"),
        ("stages: [unclosed", "not a YAML pipeline file"),
        ("stages:\n  - {name: a, run: [fit, 1], output: o}", "stages.run: Expected a <class 'str'>"),
        ("stages:\n  - {name: a, run: fit, output: o}\nsummary: [s.json]", "summary: Expected a <class 'str'>"),
        ("- {name: a, run: fit, output: o}", "Unexpected config: - {name: a"),
    ],
)
def test_bad_pipeline_file_names_the_key(tmp_path, content, message) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"p\.yaml") as err:
        read_pipeline(path)
    assert message in str(err.value)


def test_sigterm_between_stages_stops_the_pipeline_with_a_line_and_exit_143(tmp_path, capsys, monkeypatch) -> None:
    """Outside a stage's Lightning loop (which stops itself at a step boundary), SIGTERM ends the pipeline with one
    line and exit 143, the finished stage's output kept and the next stage not started."""
    import os
    import signal

    from atspeed.errors import SIGTERM_EXIT
    from atspeed.pipeline import main as pipeline_main

    stages = [{"name": name, "run": "fit", "output": str(tmp_path / name)} for name in ("a", "b")]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"stages": stages}))
    ran = []

    def stage_then_sigterm(stage) -> None:
        ran.append(stage.name)
        stage.output.mkdir()
        os.kill(os.getpid(), signal.SIGTERM)  # arrives as the stage returns, before the next one starts

    monkeypatch.setattr("atspeed.pipeline.run_stage", stage_then_sigterm)

    def ignore(*args) -> None:  # stands in for the handler a caller had: on the old code, not pytest's end
        pass

    previous = signal.signal(signal.SIGTERM, ignore)
    try:
        with pytest.raises(SystemExit) as stopped:
            pipeline_main([str(tmp_path / "p.yaml")])
    finally:
        restored = signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == SIGTERM_EXIT and ran == ["a"] and (tmp_path / "a").is_dir()
    assert restored is ignore  # the pipeline put back the handler it found
    lines = [line for line in capsys.readouterr().err.splitlines() if "SIGTERM" in line]
    assert lines == ["pipeline: stopped by SIGTERM; rerun the pipeline to continue"]


def test_sigterm_inside_a_stage_is_left_to_lightning(tmp_path, capsys) -> None:
    """Inside a stage's training loop the pipeline's handler leaves SIGTERM to Lightning: the step ends, last.ckpt is
    saved and the stage exits 143, which stops the pipeline."""
    from atspeed.errors import SIGTERM_EXIT
    from atspeed.pipeline import main as pipeline_main

    data, run = write_processed(tmp_path / "data"), tmp_path / "run"
    export = {"class_path": "atspeed.callbacks.export.ExportHuggingFace", "init_args": {"dirpath": str(run / "hf")}}
    sigterm = {
        "class_path": "tests.integration.interrupts.SignalAt",
        "init_args": {"signal_name": "SIGTERM", "step": 1},
    }
    callbacks = [export, sigterm]
    argv = ["fit", *tiny_args(data, run), "--trainer.callbacks", json.dumps(callbacks)]
    (tmp_path / "p.yaml").write_text(
        yaml.safe_dump({"stages": [{"name": "a", "run": argv, "output": str(run / "hf")}]})
    )
    with pytest.raises(SystemExit) as stopped:
        pipeline_main([str(tmp_path / "p.yaml")])
    assert stopped.value.code == SIGTERM_EXIT
    assert "pipeline: stage a stopped (exit 143)" in capsys.readouterr().err
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
