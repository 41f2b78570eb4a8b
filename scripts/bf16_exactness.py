"""How often strict speculative decoding in bf16 differs from beam search in bf16, and what a self-draft costs.

    python scripts/bf16_exactness.py --target runs/quickstart/target/hf --draft runs/quickstart/align/hf \
        --source movielens --requests 200 --out runs/bench/bf16_exactness.json
    python scripts/bf16_exactness.py --random --requests 64          # random 4-layer Llamas, no files needed

Both models in bf16 (on the CPU unless --device says otherwise). For K in --ks: the share of lists where
``spec_strict`` (the given draft, N = --draft-beams, gamma = --gamma) differs from ``beam``; the same with the target
as its own draft (N = K, gamma = L) and its target calls per list (1.00 = every tree accepted); and, for each
differing list, the deciding gap (the smallest score gap between consecutive items of beam's list), which says
whether the difference sits where bf16 rounding can decide. Against a float32 copy of the target's own beam search
(``fp32_beam``): how often bf16 beam search and bf16 spec_strict each differ from it, which says whether strict
decoding in bf16 is as exact as bf16 beam search is (neither can be closer to the float32 lists than the rounding of
the forwards allows). Prints a table and writes JSON. Runs against whatever
``atspeed`` is importable, so the same command measures an older checkout (PYTHONPATH=<old checkout>).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atspeed.bench.report import write_json
from atspeed.bench.workload import Workload, load_workload
from atspeed.decoding.decoders import BoundDecoder
from atspeed.decoding.settings import DecodeSettings
from atspeed.items.trie import PrefixTrie
from atspeed.tables import text_table


def random_workload(requests: int, seed: int = 0) -> Workload:
    """A 4-layer target (hidden 128) and 1-layer draft over a 1,280-token vocabulary whose last 1,024 tokens are
    identifier codes (4 levels x 256), 3,000 items, prompts of ~100 tokens; initializer 0.02 as real models."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, levels = 1280, 4
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (3000, levels), generator=gen) + 256 + 256 * torch.arange(levels)
    identifiers = torch.unique(codes, dim=0)

    def llama(hidden: int, layers: int, s: int) -> LlamaForCausalLM:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2)  # fmt: skip
        with torch.random.fork_rng():
            torch.manual_seed(s)
            return LlamaForCausalLM(cfg).eval()

    prompts = [[1, *torch.randint(3, 256, (99,), generator=gen).tolist()] for _ in range(requests)]
    trie = PrefixTrie.build(identifiers, vocab, eos_token_id=2)
    info = {"target": "random Llama (128 x 4)", "draft": "random Llama (64 x 1)"}
    return Workload(llama(128, 4, seed), llama(64, 1, seed + 1), trie, levels, 0, prompts, [[0]] * requests, info)


def decode_all(work: Workload, name: str, settings: DecodeSettings, draft, batch: int, device) -> tuple:
    decoder = BoundDecoder(name, work.target, work.trie, settings, draft=draft)
    sequences, scores, calls = [], [], []
    for ids, mask in work.batches(batch, len(work.prompts), device):
        out = decoder(ids, mask)
        sequences.append(out.sequences.cpu())
        scores.append(out.scores.float().cpu())
        calls.append(out.stats.target_calls.float())
    return torch.cat(sequences), torch.cat(scores), torch.cat(calls)


def compare(work: Workload, k: int, args, device, fp32_target: torch.nn.Module | None = None) -> dict:
    levels = work.levels
    base = DecodeSettings(num_beams=k, levels=levels, draft_beams=max(args.draft_beams, k), gamma=args.gamma,
                          pad_token_id=work.pad_token_id)  # fmt: skip
    beam_seq, beam_scores, _ = decode_all(work, "beam", base, None, args.batch, device)
    row = {"K": k, "lists": len(work.prompts)}
    fp32_seq = None
    if fp32_target is not None:
        fp32_work = dataclasses.replace(work, target=fp32_target)
        fp32_seq, _, _ = decode_all(fp32_work, "beam", base, None, args.batch, device)
        row["beam_differs_from_fp32_beam"] = float((beam_seq != fp32_seq).flatten(1).any(1).float().mean())
    runs = {"draft": (base, work.draft), "self": (DecodeSettings(k, levels, k, levels, work.pad_token_id), work.target)}
    for label, (settings, draft) in runs.items():
        seq, _, calls = decode_all(work, "spec_strict", settings, draft, args.batch, device)
        differs = (seq != beam_seq).flatten(1).any(1)
        gaps = (beam_scores[:, :-1] - beam_scores[:, 1:]).abs().min(1).values if k > 1 else torch.zeros(len(seq))
        row[f"{label}_differs"] = float(differs.float().mean())
        row[f"{label}_calls_per_list"] = float(calls.mean())
        row[f"{label}_max_deciding_gap"] = float(gaps[differs].max()) if differs.any() else None
        if fp32_seq is not None:
            row[f"{label}_differs_from_fp32_beam"] = float((seq != fp32_seq).flatten(1).any(1).float().mean())
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target")
    parser.add_argument("--draft")
    parser.add_argument("--source", default="processed")
    parser.add_argument("--path")
    parser.add_argument("--index-key-offset", type=int, default=0, help="-1 for Amazon Beauty's files (see configs)")
    parser.add_argument("--random", action="store_true", help="random 4-layer Llamas instead of exported models")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 10, 20])
    parser.add_argument("--draft-beams", type=int, default=40)
    parser.add_argument("--gamma", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.random:
        work = random_workload(args.requests)
        dtype = getattr(torch, args.dtype)
        work = dataclasses.replace(work, target=work.target.to(dtype), draft=work.draft.to(dtype))
    elif args.target and args.draft:
        work = load_workload(args.target, args.draft, args.requests, args.source, args.path, args.index_key_offset,
                             dtype=args.dtype)  # fmt: skip
    else:
        parser.error("give --target and --draft (exported model directories), or --random")
    device = torch.device(args.device)
    work = work.to(device)
    started = time.perf_counter()
    fp32_target = None if args.dtype == "float32" else copy.deepcopy(work.target).float()
    rows = [compare(work, k, args, device, fp32_target) for k in args.ks]
    result = {"dtype": args.dtype, "device": str(device), "info": work.info, "rows": rows,
              "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    print(text_table(*_table(rows), left=0))
    if args.out:
        write_json(args.out, result)
    return result


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    def pct(r: dict, key: str) -> str:
        return "-" if r.get(key) is None else f"{100 * r[key]:.1f}%"

    head = ["K", "lists", "draft: differs", "max gap", "self: differs", "calls/list", "vs fp32: beam", "spec_strict"]
    cells = []
    for r in rows:
        gap = "-" if r["draft_max_deciding_gap"] is None else f"{r['draft_max_deciding_gap']:.3f}"
        cells.append([str(r["K"]), str(r["lists"]), pct(r, "draft_differs"), gap, pct(r, "self_differs"),
                      f"{r['self_calls_per_list']:.2f}", pct(r, "beam_differs_from_fp32_beam"),
                      pct(r, "draft_differs_from_fp32_beam")])  # fmt: skip
    return head, cells


if __name__ == "__main__":
    main()
