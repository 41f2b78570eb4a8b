"""Host syncs per target call of ``predict`` with configs/tiny/decode.yaml (K = 3, N = 6, gamma = 2) at batch 1,
counted inside the decoder (``BoundDecoder.__call__``) with the dispatch-mode counter: beam <= 1, every speculative
decoder <= 2 (issue 18; before: 1.5, 15.0, 17.0 and 26.2)."""

from __future__ import annotations

import pytest

from atspeed.bench.host_syncs import HostSyncCounter
from atspeed.cli import main
from atspeed.decoding.decoders import BoundDecoder
from tests.integration.tiny_data import decode_args

LIMIT = {"beam": 1.0, "spec_strict": 2.0, "spec_relaxed": 2.0, "spec_relaxed_exact": 2.0, "spec_keyed": 2.0}


@pytest.mark.parametrize("decoder", list(LIMIT))
def test_predict_reads_back_at_most_the_limit_per_target_call(exported, tmp_path, monkeypatch, decoder) -> None:
    counted: list[tuple[int, int]] = []  # (syncs, target forwards) per batch after the first
    call = BoundDecoder.__call__

    def counting(self, input_ids, attention_mask, generator=None):
        if self.header is None or self.header.prompts_seen == 0:  # the first batch learns the header: not counted
            return call(self, input_ids, attention_mask, generator)
        with HostSyncCounter([self.target, *([self.draft] if self.draft is not None else [])]) as counter:
            out = call(self, input_ids, attention_mask, generator)
        counted.append((counter.syncs, counter.calls(self.target)))
        return out

    monkeypatch.setattr(BoundDecoder, "__call__", counting)
    args = decode_args(exported, tmp_path, "--model.init_args.decoding.decoder", decoder, "--data.eval_batch_size", "1")
    main(["predict", *args, "--data.eval.test_users", "6"])
    syncs, calls = map(sum, zip(*counted, strict=True))
    print(f"{decoder}: {syncs / calls:.2f} host syncs per target call ({syncs} / {calls})")  # shown with -s
    assert len(counted) >= 4 and calls > 0
    assert syncs / calls <= LIMIT[decoder], (decoder, syncs, calls)
