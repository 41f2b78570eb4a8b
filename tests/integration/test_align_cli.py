"""Draft alignment through the CLI: teacher data -> align -> decode on tiny models; every loss of the table trains."""

from __future__ import annotations

import csv
import json
from typing import get_args

import pytest
import torch

from atspeed.cli import main
from atspeed.losses import LossName
from tests.integration.tiny_data import align_args, decode_args


def test_teacher_align_decode(exported, teacher_data, tmp_path) -> None:
    out = tmp_path / "align"
    main(["fit", *align_args(exported, teacher_data, out)])
    (log,) = out.glob("logs/version_*/metrics.csv")
    rows = list(csv.DictReader(log.read_text().splitlines()))
    assert any(r.get("train/align") for r in rows) and any(r.get("val/mean_accepted_depth") for r in rows)
    # what predicts speed: strict and relaxed acceptance, top-K coverage at every depth (L = 2 here)
    speed = ["target_calls_per_list", "relaxed_accepted_depth", "relaxed_target_calls_per_list"]
    coverage = [f"val/coverage@{d}" for d in (1, 2)]
    logged = [r for r in rows if r.get("val/mean_accepted_depth")]
    assert logged and all(r.get(key) for r in logged for key in [*(f"val/{k}" for k in speed), *coverage])
    assert "val/coverage@3" not in rows[0]
    assert all(0.0 <= float(r[key]) <= 1.0 for r in logged for key in coverage)
    assert all(float(r["val/relaxed_accepted_depth"]) >= 0.0 for r in logged)
    assert all(float(r["val/relaxed_target_calls_per_list"]) >= 1.0 for r in logged)
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 8
    assert all(key.startswith("draft.") for key in checkpoint["state_dict"]), "the frozen target is never saved"
    # the aligned draft decodes: strict lists equal the target's own beam search
    draft = out / "hf"
    main(["predict", *decode_args(exported, tmp_path / "beam", "--model.init_args.decoding.decoder", "beam")])
    spec = ["--model.init_args.decoding.decoder", "spec_strict", "--model.init_args.draft", str(draft)]
    main(["predict", *decode_args(exported, tmp_path / "strict", *spec)])
    lists = [
        [json.loads(r)["items"] for r in (tmp_path / d / "p.jsonl").read_text().splitlines()]
        for d in ("beam", "strict")
    ]
    assert lists[0] == lists[1]


@pytest.mark.parametrize("loss", get_args(LossName))
def test_every_loss_trains_the_draft_only(exported, teacher_data, tmp_path, loss) -> None:
    extra = ["--model.init_args.loss", loss, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"]
    cli = main(align_args(exported, teacher_data, tmp_path, *extra), run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    optimized = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in cli.model.draft.parameters()}
    assert torch.isfinite(torch.tensor(float(cli.trainer.callback_metrics["train/loss"])))
    if loss != "sft":
        assert "train/align" in cli.trainer.callback_metrics
