"""Forward cost against tokens: what one target or draft call costs for a tree of t nodes after a cached prompt.

A CPU forward's cost grows with its tokens, a GPU's stays nearly flat up to a few hundred: this table, measured in
the same run as the decoding rows, says which regime the benchmark ran in and how large a verified tree can be before
it costs more than the target steps it saves. Each entry is the median of ``repeats`` forwards of t tree tokens
(a chain: each node attends the prompt and the nodes before it) appended to one cached prompt, which is cropped back
after each forward; the prefill of the prompt is timed the same way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from atspeed.decoding import kv_cache
from atspeed.decoding.tree_attention import forward_tree, prefill


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.inference_mode()
def forward_costs(
    model: torch.nn.Module, prompt: Sequence[int], token_counts: Sequence[int], repeats: int = 5, warmup: int = 2
) -> dict[str, float]:
    """Milliseconds per forward: ``prefill`` for the prompt alone, and ``str(t)`` for t tree tokens after it."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], device=device)
    mask = torch.ones_like(ids)
    length = ids.shape[1]

    def once(cache, t: int) -> None:
        tokens = ids[:, -1:].expand(1, t)  # any tokens: the cost does not depend on their values
        positions = torch.arange(length, length + t, device=device)[None]
        past = torch.ones(1, t, length, dtype=torch.bool, device=device)
        chain = torch.ones(t, t, dtype=torch.bool, device=device).tril(-1)[None]
        forward_tree(model, cache, tokens, positions, past, chain)
        kv_cache.crop(cache, length)

    costs = {}
    times = []
    for i in range(warmup + repeats):
        start = _now(device)
        prefill(model, kv_cache.new_cache(), ids, mask)
        if i >= warmup:
            times.append(_now(device) - start)
    costs["prefill"] = 1e3 * statistics.median(times)
    cache = kv_cache.new_cache()
    prefill(model, cache, ids, mask)
    for t in token_counts:
        times = []
        for i in range(warmup + repeats):
            start = _now(device)
            once(cache, t)
            if i >= warmup:
                times.append(_now(device) - start)
        costs[str(t)] = 1e3 * statistics.median(times)
    return costs


def tree_sizes(ks: Sequence[int], draft_beams: Sequence[int], gammas: Sequence[int]) -> list[int]:
    """1, the beam widths K, and every verified tree K + gamma * N of the grid, sorted."""
    sizes = {1, *ks}
    sizes |= {k + g * n for k in ks for n in draft_beams for g in gammas if n >= k}
    return sorted(sizes)


def cost_table(costs: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per model, one column per token count (ms per forward)."""
    columns = list(next(iter(costs.values())))
    lines = ["| model | " + " | ".join(f"{c} tokens" if c != "prefill" else "prefill" for c in columns) + " |"]
    lines.append("|" + "---|" * (len(columns) + 1))
    for name, row in costs.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines)
