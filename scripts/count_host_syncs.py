"""Host syncs and eager ops per target forward of each decoder, counted (not timed) on tiny seeded Llamas.

    python scripts/count_host_syncs.py --out runs/bench/host_syncs.json
    python scripts/count_host_syncs.py --layers 32 2 --batch-sizes 1   # a 7B's depth: each cache layer costs ops

The world of the decoding tests (``tests/unit/decoding_helpers.speculative_world``: 3,000 random items, 30-token
prompts), fp32 on the CPU: the counts do not depend on the machine's speed. Each row decodes one batch to learn the
shared header, then counts the second inside the decoder (``atspeed.bench.host_syncs.HostSyncCounter``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "unit")]

from decoding_helpers import left_pad, speculative_world, tiny_model  # noqa: E402

from atspeed.bench.host_syncs import HostSyncCounter  # noqa: E402
from atspeed.bench.report import write_json  # noqa: E402
from atspeed.decoding.decoders import BoundDecoder  # noqa: E402
from atspeed.decoding.settings import DecodeSettings  # noqa: E402
from atspeed.tables import text_table  # noqa: E402

GRID = [(3, 6, 2, 60, 3), (10, 40, 3, 200, 4)]  # K, N, gamma, vocabulary, levels
DECODERS = ["beam", "spec_strict", "spec_relaxed", "spec_relaxed_exact", "beam_sample_keyed", "spec_keyed"]


def count(name: str, world, settings: DecodeSettings, batch: int) -> dict:
    target, draft, trie, prompts = world
    ids, mask = left_pad(prompts[:batch])
    decoder = BoundDecoder(name, target, trie, settings, draft=draft)
    decoder(ids, mask)
    with HostSyncCounter([target, draft]) as counter:
        decoder(ids, mask)
    forwards = counter.calls(target)
    ops = (counter.ops - counter.model_ops) / forwards
    launches = (counter.launches - counter.model_launches) / forwards
    return {"decoder": name, "K": settings.num_beams, "N": settings.draft_beams, "gamma": settings.gamma,
            "batch": batch, "forwards": forwards, "syncs_per_call": counter.syncs / forwards, "ops_per_call": ops,
            "launches_per_call": launches,
            "syncs_by_op": dict(counter.by_op)}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--layers", type=int, nargs=2, metavar=("TARGET", "DRAFT"),
                        help="layers of the target and the draft (default: the tests' 2 and 1); each cache layer "
                             "adds the ops of its compaction")  # fmt: skip
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    rows, cells = [], []
    for k, n, gamma, vocab, levels in GRID:
        world = speculative_world(vocab, levels, [30] * max(args.batch_sizes), seed=1, draft_seed=2, prompt_seed=3,
                                  items=3000)  # fmt: skip
        if args.layers:
            world = (tiny_model(vocab, seed=1, layers=args.layers[0]),
                     tiny_model(vocab, seed=2, hidden=16, layers=args.layers[1]), *world[2:])  # fmt: skip
        for name in DECODERS:
            for batch in args.batch_sizes:
                row = count(name, world, DecodeSettings(num_beams=k, levels=levels, draft_beams=n, gamma=gamma), batch)
                rows.append({**row, "layers": [m.config.num_hidden_layers for m in world[:2]]})
                cells.append([str(k), str(n), str(gamma), name, str(batch), f"{row['syncs_per_call']:.2f}",
                              f"{row['ops_per_call']:.0f}", f"{row['launches_per_call']:.0f}"])  # fmt: skip
    print(text_table(["K", "N", "gamma", "decoder", "batch", "syncs/call", "ops/call", "launches/call"], cells,
                     left=0))  # fmt: skip
    if args.out:
        write_json(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
