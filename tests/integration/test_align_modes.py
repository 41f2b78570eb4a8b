"""The alignment's teacher modes on tiny models: ``recompute`` equals ``cached`` up to the stored float16 rounding;
``on_policy`` trains on the draft's own beams (logged per batch, reproducible, only the draft saved); teacher data
without distributions is smaller, refused by ``cached`` and trained on by ``recompute``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from atspeed.cli import main
from atspeed.data.teacher_store import MANIFEST, TeacherStore, teacher_fingerprint
from atspeed.modules.align import GENERATOR_KEY
from tests.integration.test_bad_input import fails
from tests.integration.tiny_data import align_args, teacher_args

QUICK = ["--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1"]


def _rows(out: Path) -> list[dict[str, str]]:
    (log,) = out.glob("logs/version_*/metrics.csv")
    return list(csv.DictReader(log.read_text().splitlines()))


@pytest.fixture(scope="module")
def on_policy(exported, teacher_data, tmp_path_factory):
    """A 3-step fit where every batch is on-policy (ratio 1); the module stays in memory for direct calls."""
    out = tmp_path_factory.mktemp("on_policy")
    mode = ["--model.init_args.teacher", "on_policy", "--model.init_args.on_policy_ratio", "1.0"]
    cli = main(align_args(exported, teacher_data, out, *mode, "--trainer.max_steps", "3", *QUICK), run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, out


def test_on_policy_trains_the_draft_only_and_logs_every_batch(on_policy) -> None:
    cli, out = on_policy
    flags = [float(r["train/on_policy"]) for r in _rows(out) if r.get("train/on_policy")]
    assert flags == [1.0, 1.0, 1.0]
    assert all(torch.isfinite(torch.tensor(float(r["train/loss"]))) for r in _rows(out) if r.get("train/loss"))
    optimized = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in cli.model.draft.parameters()}
    assert cli.model.frozen is not None and not any(p.requires_grad for p in cli.model.frozen.model.parameters())
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert all(key.startswith("draft.") for key in checkpoint["state_dict"]), "the frozen target is never saved"
    # the mixing generator's state after 3 batches (two draws each) is saved, and a resumed module takes it up
    replay = torch.Generator().manual_seed(0)
    for _ in range(3):
        torch.rand((), generator=replay), torch.randint(2**62, (), generator=replay)
    assert torch.equal(checkpoint[GENERATOR_KEY], replay.get_state())
    fresh = torch.Generator().manual_seed(0).get_state()
    cli.model.mixing.set_state(fresh)
    cli.model.on_load_checkpoint(checkpoint)
    assert torch.equal(cli.model.mixing.get_state(), replay.get_state())


def test_recompute_equals_cached_and_ratio_0_is_cached(on_policy, monkeypatch) -> None:
    """On the same batch and draft: ``recompute`` (float32 from the frozen target) equals ``cached`` (float16 from
    the shards) within float16 rounding; ``on_policy`` at ratio 0 is ``cached`` exactly, flagged 0; at ratio 1 the
    draft's own beams give another loss, flagged 1."""
    cli, _ = on_policy
    model = cli.model
    batch = next(iter(cli.datamodule.train_dataloader()))

    def losses(teacher: str, ratio: float = 0.5) -> dict[str, torch.Tensor]:
        monkeypatch.setitem(model.hparams, "teacher", teacher)
        monkeypatch.setitem(model.hparams, "on_policy_ratio", ratio)
        with torch.no_grad():
            return model._losses(batch)

    cached, recompute = losses("cached"), losses("recompute")
    assert "on_policy" not in cached and "on_policy" not in recompute
    assert torch.equal(cached["ce"], recompute["ce"])
    torch.testing.assert_close(recompute["align"], cached["align"], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(recompute["loss"], cached["loss"], atol=2e-3, rtol=2e-3)
    off = losses("on_policy", 0.0)
    assert float(off["on_policy"]) == 0.0 and torch.equal(off["loss"], cached["loss"])
    on = losses("on_policy", 1.0)
    assert (
        float(on["on_policy"]) == 1.0 and torch.isfinite(on["loss"]) and not torch.equal(on["align"], cached["align"])
    )


def test_teacher_data_without_distributions(exported, teacher_data, tmp_path, capsys) -> None:
    """Beams, scores and truth only: much smaller; ``cached`` refuses it before any model; ``recompute`` trains."""
    out = tmp_path / "teacher"
    main(["predict", *teacher_args(exported, out, "--model.init_args.distributions", "false")])
    beams_only = out / "data"
    size = {d: sum(p.stat().st_size for p in d.glob("*.safetensors")) for d in (beams_only, teacher_data)}
    assert size[beams_only] < size[teacher_data], size  # tiny here: 4 codes a level; 256 on real data
    assert json.loads((beams_only / MANIFEST).read_text())["fingerprint"]["settings"]["distributions"] is False
    store = TeacherStore(beams_only, teacher_fingerprint(exported[1], beams_only))
    assert store.keys == {"sample_id", "beams", "scores", "truth"} and set(store[0]) == store.keys
    err = fails(align_args(exported, beams_only, tmp_path / "cached"), capsys)
    assert "model.teacher" in err and "recompute or on_policy" in err
    assert not (tmp_path / "cached" / "checkpoints").exists()
    run = tmp_path / "recompute"
    main(
        [
            "fit",
            *align_args(
                exported, beams_only, run, "--model.init_args.teacher", "recompute", "--trainer.max_steps", "2", *QUICK
            ),
        ]
    )
    rows = [r for r in _rows(run) if r.get("train/align")]
    assert rows and all(torch.isfinite(torch.tensor(float(r["train/loss"]))) for r in rows)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--model.init_args.on_policy_ratio", "1.5"],
            "model.init_args.on_policy_ratio: Not of type ClosedUnitInterval",
        ),
        (
            ["--model.init_args.on_policy_ratio", "-0.1"],
            "model.init_args.on_policy_ratio: Not of type ClosedUnitInterval",
        ),
        (["--model.init_args.teacher", "offline"], "'cached', 'recompute', 'on_policy'"),
    ],
)
def test_bad_teacher_mode_settings(exported, teacher_data, tmp_path, capsys, extra, message) -> None:
    err = fails(align_args(exported, teacher_data, tmp_path / "run", *extra), capsys)
    assert message in err


def test_ce_on_all_is_the_cross_entropy_over_prompt_identifier_and_eos(on_policy, monkeypatch) -> None:
    """``ce_on: all`` (the AtSpeed authors' CE) equals a hand-computed mean over every label token (each request
    alone, unpadded: the prompt after BOS, the identifier's codes, EOS); ``item`` is another number; the alignment
    term is the same under both."""
    cli, _ = on_policy
    model = cli.model
    batch = next(iter(cli.datamodule.train_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max(), "the batch should mix prompt lengths (left padding)"
    monkeypatch.setitem(model.hparams, "teacher", "cached")
    with torch.no_grad():
        item = model._losses(batch)
        monkeypatch.setitem(model.hparams, "ce_on", "all")
        every = model._losses(batch)
        truth = model._cached(batch["request_ids"])["truth"]
        eos = torch.tensor([cli.datamodule.prepared.tokenizer.eos_token_id])
        total, count = torch.zeros((), dtype=torch.float64), 0
        for ids, mask, codes in zip(batch["input_ids"], batch["attention_mask"], truth, strict=True):
            sequence = torch.cat([ids[mask.bool()], codes, eos])  # [BOS] prompt identifier EOS
            log_probs = model.draft(input_ids=sequence[None]).logits[0].double().log_softmax(-1)
            total -= log_probs[:-1].gather(1, sequence[1:, None]).sum()
            count += len(sequence) - 1
    torch.testing.assert_close(every["ce"].double(), total / count, rtol=1e-5, atol=1e-6)
    assert abs(float(every["ce"]) - float(item["ce"])) > 1e-3
    assert torch.equal(every["align"], item["align"])
