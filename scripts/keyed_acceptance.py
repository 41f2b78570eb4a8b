"""Accepted depth of spec_keyed (shared keyed Gumbel noise) beside spec_strict, with the same drafts.

    python scripts/keyed_acceptance.py --out runs/bench/keyed_acceptance.json [--k 10 --n 40 --gamma 3]

A quick-start-like world of tiny seeded Llamas (no training): L = 4 levels of 32 codes, 1,600 random items, 64 prompts
of 20 to 40 tokens, batches of 16 (K = 10, N = 40, gamma = 3 by default; in so sparse a trie N = 40 covers every child
of level 1 and of the deep levels, so smaller N tell the decoders apart better). Drafts: the target itself, the target
with every weight perturbed by Gaussian noise of the given relative scale (drafts that rank more or less like the
target), and an unrelated 1-layer model. Each row: mean accepted depth per verification call and target calls per list
of both decoders, their ratio, and whether spec_keyed returned beam_sample_keyed's lists.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "unit")]

from decoding_helpers import EOS, left_pad, random_prompts, tiny_model  # noqa: E402

from atspeed.bench.report import write_json  # noqa: E402
from atspeed.decoding.decoders import DecodeSettings, decode  # noqa: E402
from atspeed.items.trie import PrefixTrie  # noqa: E402

LEVELS, CODES, ITEMS, FIRST = 4, 32, 1600, 8


def world(seed: int) -> tuple[torch.nn.Module, PrefixTrie, list[list[int]]]:
    vocab = FIRST + LEVELS * CODES
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, CODES, (3 * ITEMS, LEVELS), generator=gen) + FIRST + CODES * torch.arange(LEVELS)
    unique = torch.unique(codes, dim=0)
    trie = PrefixTrie.build(unique[torch.randperm(len(unique), generator=gen)[:ITEMS]], vocab, eos_token_id=EOS)
    lengths = torch.randint(20, 41, (64,), generator=gen).tolist()
    return tiny_model(vocab, seed=seed, hidden=64), trie, random_prompts(vocab, lengths, seed=seed + 1)


def perturbed(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with each weight w replaced by w + scale * std(w) * N(0, 1)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))
    return out


def measure(target, draft, trie, prompts, settings: DecodeSettings) -> dict:
    row = {}
    for name in ("spec_strict", "spec_keyed"):
        accepted, calls = [], []
        for start in range(0, len(prompts), 16):
            ids, mask = left_pad(prompts[start : start + 16])
            out = decode(name, target, ids, mask, trie, settings, draft=draft)
            accepted.append(out.stats.accepted.float())
            calls.append(out.stats.target_calls.float())
            if name == "spec_keyed":
                ref = decode("beam_sample_keyed", target, ids, mask, trie, settings)
                row["keyed_equals_beam_sample_keyed"] = row.get("keyed_equals_beam_sample_keyed", True) and bool(
                    torch.equal(out.sequences, ref.sequences)
                )
        row[f"{name}_accepted_depth"] = float(torch.cat(accepted).mean())
        row[f"{name}_target_calls_per_list"] = float(torch.cat(calls).mean())
    row["keyed_over_strict"] = row["spec_keyed_accepted_depth"] / max(row["spec_strict_accepted_depth"], 1e-9)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.4])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    target, trie, prompts = world(args.seed)
    settings = DecodeSettings(args.k, LEVELS, draft_beams=args.n, gamma=args.gamma, seed=args.seed)
    drafts = {f"target + {s:g} noise": perturbed(target, s, args.seed + 7) for s in args.scales}
    drafts["unrelated 1-layer"] = tiny_model(target.config.vocab_size, seed=args.seed + 100, hidden=32, layers=1)
    rows = []
    for label, draft in drafts.items():
        rows.append({"draft": label, **measure(target, draft, trie, prompts, settings)})
        r = rows[-1]
        print(f"{label:22s} accepted strict {r['spec_strict_accepted_depth']:.3f} keyed "
              f"{r['spec_keyed_accepted_depth']:.3f} ({r['keyed_over_strict']:.0%}); calls/list strict "
              f"{r['spec_strict_target_calls_per_list']:.2f} keyed {r['spec_keyed_target_calls_per_list']:.2f}; "
              f"keyed = beam_sample_keyed: {r['keyed_equals_beam_sample_keyed']}", flush=True)  # fmt: skip
    if args.out is not None:
        head = {"K": args.k, "N": args.n, "gamma": args.gamma, "levels": LEVELS, "requests": len(prompts)}
        write_json(args.out, {**head, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
