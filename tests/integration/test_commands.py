"""One CLI family: ``python -m atspeed pipeline|sweep|export`` are jsonargparse commands like the stages (``--help``,
``--print_config``, ``--config FILE``) behind one dispatch table, and ranges are types, refused while parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from atspeed.__main__ import main
from tests.integration.tiny_data import ALIGN_CONFIG, run_cli


def _exits(argv: list[str], capsys) -> tuple[int, str, str]:
    """``python -m atspeed <argv>`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        code = main(argv)
        raise SystemExit(code)
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out, out.err


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("pipeline", ["--config", "--stages", "--summary", "--print_config"]),
        ("sweep", ["file", "--count", "--dir", "--config", "--print_config", "PositiveInt"]),
        ("export", ["ckpt", "--out", "--single-file", "--config", "--print_config"]),
    ],
)
def test_each_command_answers_help_with_its_options(capsys, command, options) -> None:
    code, out, _ = _exits([command, "--help"], capsys)
    assert code == 0 and f"python -m atspeed {command}" in out
    assert all(option in out for option in options), out


@pytest.fixture
def no_run(monkeypatch) -> None:
    """--print_config must print and stop: nothing of the command runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command ran")

    monkeypatch.setattr("atspeed.pipeline.run_pipeline", refuse)
    monkeypatch.setattr("atspeed.sweep.spec.read_sweep", refuse)
    monkeypatch.setattr("atspeed.export_checkpoint.check_inputs", refuse)


def _pipeline_file(tmp_path: Path) -> Path:
    stage = {"name": "t", "run": "fit --config configs/tiny/target_sft.yaml", "output": str(tmp_path / "t" / "hf")}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"stages": [stage], "summary": str(tmp_path / "summary.json")}))
    return path


def test_print_config_of_each_command_and_back_through_config(tmp_path, capsys, no_run) -> None:
    """Each command prints its parsed options as YAML; that YAML given back with --config parses to the same."""
    pipeline = _pipeline_file(tmp_path)
    commands = {
        "pipeline": [str(pipeline), "--summary", str(tmp_path / "other.json")],
        "sweep": ["sweeps/align_alpha.yaml", "--count", "3"],
        "export": ["last.ckpt", "--out", str(tmp_path / "hf"), "--single-file", str(tmp_path / "fp32.ckpt")],
    }
    expected = {
        "pipeline": {"summary": str(tmp_path / "other.json"), "stages": yaml.safe_load(pipeline.read_text())["stages"]},
        "sweep": {"file": "sweeps/align_alpha.yaml", "count": 3, "dir": None},
        "export": {"ckpt": "last.ckpt", "out": str(tmp_path / "hf"), "single_file": str(tmp_path / "fp32.ckpt")},
    }
    for name, args in commands.items():
        code, out, err = _exits([name, *args, "--print_config"], capsys)
        assert code == 0, err
        assert yaml.safe_load(out) == expected[name]
        saved = tmp_path / f"{name}.yaml"
        saved.write_text(out)
        code, again, err = _exits([name, "--config", str(saved), "--print_config"], capsys)
        assert code == 0 and again == out, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sweep", "sweeps/align_alpha.yaml", "--count", "0"], "error: count: Not of type PositiveInt"),
        (["export", "last.ckpt"], "error: the following arguments are required: out"),
        (["pipeline", "--stages", json.dumps([{"name": "a", "run": "fit"}])], "stages: the following arguments"),
    ],
)
def test_bad_command_options_stop_with_one_line(capsys, no_run, argv, message) -> None:
    code, _, err = _exits(argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and "usage:" not in err


@pytest.mark.parametrize(
    ("key", "value", "type_name"),
    [
        ("model.init_args.alpha", "1.5", "ClosedUnitInterval"),
        ("model.init_args.on_policy_ratio", "-0.1", "ClosedUnitInterval"),
        ("model.init_args.warmup_steps", "-1", "NonNegativeInt"),
        ("model.init_args.weight_decay", "-0.5", "NonNegativeFloat"),
        ("progress.every_seconds", "0", "PositiveFloat"),
    ],
)
def test_out_of_range_values_are_refused_by_parsing(capsys, key, value, type_name) -> None:
    """--print_config builds nothing: a value refused here is refused by the parser (its type), not a constructor."""
    code, out, err = _exits(["fit", "--config", ALIGN_CONFIG, f"--{key}", value, "--print_config"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and not out and len(lines) == 1, err
    assert lines[0].startswith(f"error: {key}: Not of type {type_name}") and value in lines[0]


@pytest.mark.parametrize(("key", "value"), [("hidden_size", "0"), ("num_layers", "-1"), ("intermediate_size", "0")])
def test_model_sizes_are_refused_by_parsing(capsys, key, value) -> None:
    """A model built from scratch: its sizes are PositiveInt, refused while parsing (before any data or model)."""
    full = f"model.init_args.model.{key}"
    code, out, err = _exits(["fit", "--config", "configs/tiny/target_sft.yaml", f"--{full}", value, "--print_config"],
                            capsys)  # fmt: skip
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and not out and len(lines) == 1, err
    assert lines[0].startswith(f"error: {full}: ") and "PositiveInt" in lines[0] and value in lines[0]


def test_python_m_atspeed_refuses_alpha_above_one_while_parsing() -> None:
    """The issue's own command, in a fresh process: exit 2 with one line naming the key."""
    done = run_cli("fit", ["--config", "configs/tiny/align.yaml", "--model.init_args.alpha", "1.5", "--print_config"])
    assert done.returncode == 2 and not done.stdout, done.stderr
    wanted = "model.init_args.alpha: Not of type ClosedUnitInterval: 1.5 does not conform to restriction v>=0 and v<=1"
    assert done.stderr.strip().splitlines() == [f"error: {wanted}"]
