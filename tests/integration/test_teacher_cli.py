"""Teacher data through the CLI: every training sample's target beams and distributions in shards; an interrupted
run resumes after its complete shards and ends with the same data; foreign teacher data is refused."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from atspeed.cli import main
from atspeed.data.teacher_store import TeacherStore, fingerprint
from atspeed.decoding.teaching.teacher_forest import level_codes, prefix_forest
from tests.integration.tiny_data import teacher_args

SAMPLES = 96  # training samples of the tiny data (24 users x 4 sliding positions)


class CrashAtPredictBatch(pl.Callback):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.batch:
            raise RuntimeError("simulated crash")


def _store(cli, out: Path) -> TeacherStore:
    return TeacherStore(out / "data", fingerprint(cli.model.hparams.target, cli.model.settings()))


def _run(exported, out: Path, *callbacks):
    cli = main(teacher_args(exported, out), run=False)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    return cli


@pytest.fixture(scope="module")
def straight(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cli = _run(exported, out)
    return cli, _store(cli, out)


def test_every_training_sample_has_beams_and_distributions(straight) -> None:
    cli, store = straight
    assert len(store) == SAMPLES and store.sample_ids() == list(range(SAMPLES))
    sample = store[5]
    beams, scores, logprobs = sample["beams"], sample["scores"], sample["node_logprobs"]
    assert beams.shape == (4, 2) and torch.all(scores[:-1] >= scores[1:])
    assert logprobs.dtype == torch.float16
    assert set(sample) == {"sample_id", "beams", "scores", "truth", "node_logprobs"}  # node tables are derived
    forest = prefix_forest(torch.cat([beams, sample["truth"][None]])[None])  # the stage's nodes, in its order
    valid = forest.valid[0]
    logprobs = logprobs[: valid.shape[0]]
    assert torch.isfinite(logprobs[valid]).any(dim=-1).all(), "every real node has a distribution"
    assert not torch.isfinite(logprobs[~valid]).any()
    assert not torch.isfinite(sample["node_logprobs"][valid.shape[0] :]).any(), "shard padding holds nothing"
    # a beam's score is the sum of its tokens' log-probabilities at its prefixes' nodes
    columns = level_codes(cli.model.dm.prepared.trie)  # [L, C]
    for k in range(4):
        total = 0.0
        for t in range(2):
            node = int(forest.slot_node[0, k, t])
            column = int((columns[t] == beams[k, t]).nonzero())
            total += float(logprobs[node, column])
        assert abs(total - float(scores[k])) < 2e-2  # fp16 storage


def test_an_interrupted_run_resumes_after_its_complete_shards(exported, straight, tmp_path) -> None:
    _, reference = straight
    out = tmp_path / "teacher"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(exported, out, CrashAtPredictBatch(4))  # after 5 batches of 8: two shards of 16 complete
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "shard-r0-00000.safetensors",
        "shard-r0-00001.safetensors",
    ]
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()}
    cli = _run(exported, out)
    assert cli.model.skip == set(range(32)), "the samples of complete shards are not decoded again"
    assert all((out / "data" / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    store = _store(cli, out)
    assert store.sample_ids() == reference.sample_ids()
    for sample in (0, 31, 32, 95):
        got, want = store[sample], reference[sample]
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (sample, key)
