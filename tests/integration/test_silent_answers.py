"""No silent wrong answers in the alignment stage (CLI, tiny models): truncated teacher data trains every loss that
is finite on it (against the trie's codes, not the stored top-k) and is refused for the others; options that train
nothing and edited teacher shards are refused with one ``error:`` line before any model is built."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from atspeed.cli import main
from tests.integration.test_bad_input import fails
from tests.integration.tiny_data import align_args, teacher_args

QUICK = ["--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1"]


@pytest.fixture(scope="module")
def truncated(exported, tmp_path_factory) -> dict[int, Path]:
    """Teacher data of the tiny target kept to its top 1 and top 2 codes per node (4 codes a level)."""
    out = {}
    for k in (1, 2):
        root = tmp_path_factory.mktemp(f"top{k}")
        main(["predict", *teacher_args(exported, root, "--model.init_args.top_k", str(k))])
        out[k] = root / "data"
    return out


def _train(exported, teacher_dir: Path, out: Path, loss: str, steps: int = 2) -> list[dict[str, float]]:
    """A short fit with ``loss``; its logged training rows."""
    extra = ["--model.init_args.loss", loss, "--trainer.max_steps", str(steps), *QUICK]
    main(["fit", *align_args(exported, teacher_dir, out, *extra)])
    (log,) = out.glob("logs/version_*/metrics.csv")
    rows = csv.DictReader(log.read_text().splitlines())
    return [{k: float(v) for k, v in r.items() if k.startswith("train/") and v} for r in rows if r.get("train/loss")]


def test_seq_kd_on_top_2_teacher_data_is_the_loss_on_full_data(exported, teacher_data, truncated, tmp_path) -> None:
    """seq_kd reads only the beams, which truncation keeps: the same losses, step for step (before: inf, the cut
    codes taken for forbidden ones, some beams' own tokens among them)."""
    cut = _train(exported, truncated[2], tmp_path / "cut", "seq_kd")
    full = _train(exported, teacher_data, tmp_path / "full", "seq_kd")
    assert len(cut) == 2 and all(math.isfinite(r["train/loss"]) for r in cut)
    assert cut == full


@pytest.mark.parametrize("loss", ["word_kd", "atspeed_r"])
def test_top_1_teacher_data_still_trains(exported, truncated, tmp_path, loss: str) -> None:
    """Against the target's best code, over every code the trie allows: not 0 (before: exactly 0, q and p both
    restricted to the one stored code)."""
    (row,) = _train(exported, truncated[1], tmp_path / loss, loss, steps=1)
    assert math.isfinite(row["train/align"]) and row["train/align"] > 0.01


def test_reverse_kl_losses_refuse_truncated_teacher_data(exported, truncated, tmp_path, capsys) -> None:
    err = fails(align_args(exported, truncated[2], tmp_path / "run"), capsys)  # the config's loss: atspeed_s
    assert err.startswith(f"error: {truncated[2]}: teacher data truncated to the target's top 2 codes")
    assert "model.loss atspeed_s" in err and "model.teacher recompute" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_atspeed_s_with_a_top_1_support_is_refused(exported, teacher_data, tmp_path, capsys) -> None:
    """A support of one code: zero loss and zero gradient at every position (before: trained on nothing)."""
    err = fails(
        align_args(exported, teacher_data, tmp_path / "run", "--model.init_args.loss_options.top_k", "1"), capsys
    )
    assert "model.loss_options.top_k = 1 with model.loss atspeed_s" in err
    run = tmp_path / "run"
    assert not run.exists() or [p.name for p in run.iterdir()] == [".atspeed.lock"], "nothing but the run's lock"


def test_an_edited_teacher_shard_is_refused_naming_it(exported, teacher_data, tmp_path, capsys) -> None:
    """One tensor edited, the shard's metadata kept (still a shard of this target): its sha256 is not the manifest's
    (before: read without complaint, and it changed the trained draft)."""
    copy = tmp_path / "teacher"
    shutil.copytree(teacher_data, copy)
    shard = sorted(copy.glob("shard-*.safetensors"))[0]
    with safe_open(str(shard), framework="pt") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    tensors["scores"][0, 0] += 1.0
    save_file(tensors, str(shard), metadata=meta)
    err = fails(align_args(exported, copy, tmp_path / "run"), capsys)
    assert err.startswith(f"error: {shard}: its sha256 differs from the one manifest.json recorded")
    assert not (tmp_path / "run" / "checkpoints").exists()
