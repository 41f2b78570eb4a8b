"""DeepSpeed configs: every shipped one is accepted by DeepSpeed's own config classes and merges into a training
stage's config; a bad one stops the CLI with one message naming the key, before any model or process group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from atspeed.cli import main
from atspeed.deepspeed_config import check_deepspeed_config, offloads_optimizer, strategy_config
from atspeed.errors import DataError
from atspeed.modules.optim import _adamw

deepspeed_config = pytest.importorskip("deepspeed.runtime.config")
ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs" / "deepspeed").glob("*.yaml"))


def _strategy(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["trainer"]["strategy"]


def test_four_configs_ship() -> None:
    assert [p.stem for p in SHIPPED] == ["zero2", "zero2_offload", "zero3", "zero3_offload"]
    assert all(p.with_suffix(".json").is_file() for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_deepspeed_accepts_each_shipped_config_as_lightning_completes_it(path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # the YAML names its JSON relative to the repository root
    config = strategy_config(_strategy(path))
    check_deepspeed_config(config)
    # what Lightning adds before deepspeed.initialize: accumulation, the loader's micro batch, clipping
    full = deepspeed_config.DeepSpeedConfig(
        {**config, "gradient_accumulation_steps": 4, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0}
    )
    stage = int(path.stem[4])
    assert full.zero_optimization_stage == stage and full.bfloat16_config.enabled
    assert full.gradient_accumulation_steps == 4 and full.train_micro_batch_size_per_gpu == 8
    offload = path.stem.endswith("offload")
    assert offloads_optimizer(type("S", (), {"config": config})()) == offload
    assert (full.zero_config.offload_param is not None) == (offload and stage == 3)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_each_config_merges_into_a_training_stage(path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/beauty/target_sft.yaml", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out[out.index("seed_everything") :])  # importing DeepSpeed may log a line first
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"].endswith("DeepSpeedStrategy") and printed["trainer"]["precision"] == "bf16-mixed"
    assert strategy["init_args"]["config"] == f"configs/deepspeed/{path.stem}.json"


def _write(tmp_path: Path, config) -> Path:
    path = tmp_path / "ds.yaml"
    strategy = {"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy", "init_args": {"config": config}}
    path.write_text(yaml.safe_dump({"trainer": {"strategy": strategy}}))
    return path


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"zero_optimization": {"stage": 5}},
            "DeepSpeed refuses it: 1 validation error for DeepSpeedZeroConfig | stage",
        ),
        ({"zero_optimization": {"stage": 2, "reduce_bucket": 5}}, "reduce_bucket"),
        (
            {"zero_optimisation": {"stage": 2}},
            "zero_optimisation: not a DeepSpeed key; did you mean 'zero_optimization'",
        ),
        ({"gradient_accumulation_steps": 2}, "set trainer.accumulate_grad_batches instead"),
        ("missing.json", "DeepSpeed config file not found: missing.json"),
    ],
)
def test_bad_deepspeed_configs_stop_the_cli_naming_the_key(config, message, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["fit", "--config", str(ROOT / "configs/beauty/target_sft.yaml"), "--config", str(_write(tmp_path, config))]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "trainer.strategy" in err and message in err, err
    assert "Seed set" not in err  # nothing was instantiated


def test_a_json_config_file_is_read_and_checked(tmp_path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}))
    strategy = {"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy", "init_args": {"config": str(path)}}
    check_deepspeed_config(strategy_config(strategy))
    path.write_text("{not json")
    with pytest.raises(DataError, match="is not JSON"):
        strategy_config(strategy)
    with pytest.raises(DataError, match="configs/deepspeed"):
        strategy_config("deepspeed_stage_2")
    assert strategy_config("ddp") is None and strategy_config({"class_path": "DDPStrategy"}) is None


def test_zero_offload_trains_with_deepspeeds_cpu_adam() -> None:
    """The optimizer class only (building DeepSpeed's CPU Adam compiles an op): offload -> DeepSpeedCPUAdam."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    def module(config):
        strategy = type("Strategy", (), {"config": config})()
        return type("Module", (), {"_trainer": type("Trainer", (), {"strategy": strategy})()})()

    assert (
        _adamw(module({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})) is DeepSpeedCPUAdam
    )
    assert _adamw(module({"zero_optimization": {"stage": 2}})).__name__ == "AdamW"
    assert _adamw(type("Module", (), {"_trainer": None})()).__name__ == "AdamW"
