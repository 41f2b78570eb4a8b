"""Every shipped config parses (with the CLI's own parser), alone and merged with the logger add-ons."""

from __future__ import annotations

from pathlib import Path

import pytest

from atspeed.cli import main

ROOT = Path(__file__).resolve().parents[2]
STAGE_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "loggers")
SHARED = ROOT.parent / "shared" / "data" / "amazon-beauty"


@pytest.mark.parametrize("config", STAGE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses(config: Path, tmp_path, monkeypatch) -> None:
    if "beauty" in config.parts and not SHARED.is_dir():
        pytest.skip("needs ../shared/data/amazon-beauty")
    monkeypatch.chdir(ROOT)
    data = tmp_path / "data"
    args = ["--config", str(config), "--config", str(ROOT / "configs/loggers/wandb.yaml")]
    if "tiny" in config.parts:
        from tests.integration.tiny_data import write_processed

        args += ["--data.path", str(write_processed(data))]
    cli = main(args, run=False)
    assert cli.model is not None and cli.datamodule is not None
    assert type(cli.trainer.logger).__name__ == "WandbLogger"


def test_print_config_merges_configs_and_dotted_overrides(capsys) -> None:
    args = ["fit", "--config", str(ROOT / "configs/quickstart/target_sft.yaml")]
    args += ["--config", str(ROOT / "configs/loggers/wandb.yaml"), "--data.max_history", "7", "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "max_history: 7" in out and "WandbLogger" in out and "every_n_train_steps: 200" in out
