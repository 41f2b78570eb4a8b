"""Sweeps: the shipped W&B sweep files are valid and every run they can generate parses in the CLI; the offline
runner runs a tiny grid, writes its table and plot, resumes, and stops bad input before any run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from atspeed.sweep import main as sweep_main
from atspeed.sweep.check import check_sweep, parse_run
from atspeed.sweep.runner import SweepState, next_values
from atspeed.sweep.spec import read_sweep
from tests.integration.tiny_data import ROOT, tiny_args, write_processed

pytest.importorskip("sweeps", reason="the sweeps extra (pip install --no-deps sweeps) is not installed")
SHIPPED = sorted((ROOT / "sweeps").glob("*.yaml"))
COMMAND = ["${env}", "${interpreter}", "-m", "${program}"]


def _probe_count(config: dict) -> int:
    """Values each parameter can take at its extremes: categorical values, or the two ends of a range."""
    return math.prod(len(spec["values"]) if "values" in spec else 2 for spec in config["parameters"].values())


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_sweep_files_are_valid_and_every_run_parses(path, tmp_path) -> None:
    import sweeps

    config = yaml.safe_load(path.read_text())
    assert sweeps.schema_violations_from_proposed_config(config) == []  # W&B's own schema
    sweep = read_sweep(path, count=4)
    assert sweep.argv({})[0] in ("fit", "predict")
    assert check_sweep(sweep, tmp_path) == _probe_count(config)  # each one parsed by the CLI, nothing built


def test_shipped_sweeps_cover_what_they_promise() -> None:
    align = read_sweep(ROOT / "sweeps/align_alpha.yaml", count=4)
    assert set(align.parameters["model.init_args.loss"]["values"]) == {"atspeed_s", "atspeed_r"}
    assert align.metric == "val/mean_accepted_depth" and align.goal == "maximize"
    decode = read_sweep(ROOT / "sweeps/decode_n_gamma.yaml")
    assert set(decode.parameters["model.init_args.decoding.decoder"]["values"]) == {"spec_strict", "spec_relaxed"}
    assert {"model.init_args.decoding.draft_beams", "model.init_args.decoding.gamma"} <= set(decode.parameters)
    assert decode.metric == "decode/ratio_over_beam"


def _write_sweep(tmp_path: Path, data: Path, **changes) -> Path:
    config = {
        "program": "atspeed",
        "method": "grid",
        "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"model.init_args.lr": {"values": [0.01, 0.003]}},
        "command": [*COMMAND, "fit", *tiny_args(data, tmp_path / "unused"), "--ckpt_path", "last", "${args}"],
    }
    config.update(changes)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


def _last_val_loss(metrics: Path) -> float:
    """The last val/loss in a run's own CSV log (Lightning's CSVLogger)."""
    return [float(row["val/loss"]) for row in _csv(metrics) if row.get("val/loss")][-1]


@pytest.mark.slow
def test_offline_grid_runs_tabulates_plots_and_resumes(tmp_path, monkeypatch, capsys) -> None:
    data = write_processed(tmp_path / "data")
    path, out = _write_sweep(tmp_path, data), tmp_path / "out"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert sweep_main([str(path), "--dir", str(out)]) == 0
    table = _csv(out / "results.csv")
    assert [row["run"] for row in table] == ["run-000", "run-001"]
    assert [float(row["model.init_args.lr"]) for row in table] == [0.01, 0.003]
    for i, row in enumerate(table):  # the table's metric is what the run itself logged (the command's CSV logger)
        assert row["state"] == "finished"
        logged = _last_val_loss(tmp_path / f"unused/logs/version_{i}/metrics.csv")
        assert float(row["val/loss"]) == pytest.approx(logged, rel=1e-6)
    results = json.loads((out / "results.json").read_text())
    losses = {row["run"]: float(row["val/loss"]) for row in table}
    assert results["best"]["run"] == min(losses, key=losses.get)
    assert (out / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "best: run-00" in capsys.readouterr().out

    # a run that did not finish (stopped, killed) is run again on resume, the finished one is kept as it is
    state = json.loads((out / "state.json").read_text())
    state["runs"][1]["state"] = "running"
    (out / "state.json").write_text(json.dumps(state))
    kept = (out / "run-000" / "summary.json").stat().st_mtime_ns
    assert sweep_main([str(path), "--dir", str(out)]) == 0
    assert (out / "run-000" / "summary.json").stat().st_mtime_ns == kept
    assert (out / "logs/run-000.log").read_text().count("$ python -m atspeed") == 1
    assert (out / "logs/run-001.log").read_text().count("$ python -m atspeed") == 2
    runs = json.loads((out / "state.json").read_text())["runs"]
    assert [run["state"] for run in runs] == ["finished"] * 2
    # resumed from its last checkpoint (after the final step): the metrics logged before the stop are kept
    assert runs[1]["summary"]["val/loss"] == pytest.approx(losses["run-001"], rel=1e-6)
    # the grid is exhausted: a third invocation runs nothing
    assert sweep_main([str(path), "--dir", str(out)]) == 0
    assert (out / "logs/run-001.log").read_text().count("$ python -m atspeed") == 2


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_random_and_bayes_propose_values_inside_the_space(tmp_path, method) -> None:
    path = _write_sweep(
        tmp_path,
        tmp_path / "data",
        method=method,
        parameters={"model.init_args.lr": {"min": 0.001, "max": 0.1}, "data.batch_size": {"values": [8, 16]}},
    )
    sweep = read_sweep(path, count=3)
    state = SweepState("id", sweep.config, [])
    from atspeed.sweep.runner import RunRecord

    for i in range(4):
        values = next_values(sweep, state)
        assert 0.001 <= values["model.init_args.lr"] <= 0.1 and values["data.batch_size"] in (8, 16)
        state.runs.append(RunRecord(f"run-{i}", values, "finished", {"val/loss": values["model.init_args.lr"]}))
    json.dumps(state.runs[-1].values)  # plain Python values, as state.json stores them


ALIGN = {  # an alignment sweep: its runs are parsed, not built (the tiny config's target need not exist)
    "metric": {"name": "val/mean_accepted_depth", "goal": "maximize"},
    "command": [
        *COMMAND,
        "fit",
        "--config",
        str(ROOT / "configs/tiny/align.yaml"),
        "--data.source.init_args.path",
        "unused",
        "${args}",
    ],
}
BAD = [
    ({"parameters": {"model.init_args.lrr": {"values": [0.1]}}}, "lrr"),  # not a CLI key
    # values out of a key's range: the parser refuses them by their type (alpha: ClosedUnitInterval), in a grid ...
    (
        {**ALIGN, "parameters": {"model.init_args.alpha": {"values": [0.5, 1.5]}, "data.batch_size": {"values": [4]}}},
        "the run with data.batch_size=4, model.init_args.alpha=1.5 would stop: model.init_args.alpha: Not of type "
        "ClosedUnitInterval",
    ),
    # ... and at the end of a range
    ({**ALIGN, "parameters": {"model.init_args.on_policy_ratio": {"min": 0.0, "max": 1.2}}}, "on_policy_ratio=1.2"),
    ({"parameters": {"model.init_args.lr": {"values": ["fast"]}}}, "model.init_args.lr"),  # a value the CLI refuses
    ({"metric": {"name": "val/los", "goal": "minimize"}}, "val/los is never logged by atspeed.modules.sft.SFT"),
    ({"method": "bays"}, "not a valid W&B sweep configuration"),
    ({"method": "random"}, "give --count"),
    ({"command": [*COMMAND, "fit", "${args_no_hyphens}"]}, "${args_no_hyphens} is not supported"),
    ({"command": ["python", "train.py", "${args}"]}, "must run `python -m atspeed"),
]


@pytest.mark.parametrize(("changes", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_sweeps_stop_before_any_run(tmp_path, capsys, changes, message) -> None:
    path, out = _write_sweep(tmp_path, write_processed(tmp_path / "data"), **changes), tmp_path / "out"
    assert sweep_main([str(path), "--dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}" in err and message in err, err
    assert not (out / "state.json").exists() and not (out / "logs").exists()  # nothing ran


def test_a_sweep_file_that_is_not_yaml_names_its_line(tmp_path, capsys) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("method: grid\nparameters: [unclosed\n")
    assert sweep_main([str(path)]) == 2
    assert f"error: {path}, line 3: not a YAML sweep file" in capsys.readouterr().err


def test_both_override_macros_reach_the_cli_alike(tmp_path) -> None:
    """W&B's ${args} (--key=value) and ${args_no_equals} (--key value) set the same CLI values."""
    data = write_processed(tmp_path / "data")
    parsed = []
    for macro in ("${args}", "${args_no_equals}"):
        command = [*COMMAND, "fit", *tiny_args(data, tmp_path / "unused"), macro]
        sweep = read_sweep(_write_sweep(tmp_path, data, command=command))
        config = parse_run(sweep, {"model.init_args.lr": 0.25, "data.batch_size": 5}, tmp_path / "run")
        parsed.append((config.model.init_args.lr, config.data.batch_size))
    assert parsed == [(0.25, 5), (0.25, 5)]
