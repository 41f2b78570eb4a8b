"""Forward cost against tokens: what one target or draft call costs for a tree of t nodes after a cached prompt.

A CPU forward's cost grows with its tokens, a GPU's stays nearly flat up to a few hundred: this table, measured in
the same run as the decoding rows, says which regime the benchmark ran in and how large a verified tree can be before
it costs more than the target steps it saves (``budget="auto"`` plans every call with it). Each entry is the mean
of ``repeats`` forwards of t tree tokens (a chain: each node attends the prompt and the nodes before it) appended to
one cached prompt, which is cropped back after each forward; the prefill of the prompt is timed the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils import benchmark

from atspeed.decoding.cache import kv_cache
from atspeed.decoding.cache.tree_attention import forward_tree, prefill


def _ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Mean ms of ``repeats`` calls of ``fn`` after ``warmup`` (torch.utils.benchmark: CUDA synchronised, with the
    current thread count, not the Timer's default of one thread)."""
    for _ in range(warmup):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return 1e3 * timer.timeit(repeats).mean


@torch.inference_mode()
def forward_costs(
    model: torch.nn.Module, prompt: Sequence[int], token_counts: Sequence[int], repeats: int = 5, warmup: int = 2
) -> dict[str, float]:
    """Milliseconds per forward: ``prefill`` for the prompt alone, and ``str(t)`` for t tree tokens after it."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], device=device)
    mask = torch.ones_like(ids)
    length = ids.shape[1]
    cache = kv_cache.new_cache()

    def tree(t: int) -> None:
        tokens = ids[:, -1:].expand(1, t)  # any tokens: the cost does not depend on their values
        positions = torch.arange(length, length + t, device=device)[None]
        past = torch.ones(1, t, length, dtype=torch.bool, device=device)
        chain = torch.ones(t, t, dtype=torch.bool, device=device).tril(-1)[None]
        forward_tree(model, cache, tokens, positions, past, chain)
        kv_cache.crop(cache, length)

    costs = {"prefill": _ms(lambda: prefill(model, kv_cache.new_cache(), ids, mask), repeats, warmup)}
    prefill(model, cache, ids, mask)
    for t in token_counts:
        costs[str(t)] = _ms(lambda t=t: tree(t), repeats, warmup)
    return costs


def ms_at(costs: dict[str, float], tokens: int) -> float:
    """ms of a forward of ``tokens`` tokens: the measured value, or linear between the nearest measured counts."""
    points = sorted((int(t), ms) for t, ms in costs.items() if t != "prefill")
    if str(tokens) in costs:
        return costs[str(tokens)]
    below = [p for p in points if p[0] < tokens] or points[:1]
    above = [p for p in points if p[0] > tokens] or points[-1:]
    (t0, m0), (t1, m1) = below[-1], above[0]
    return m0 if t1 == t0 else m0 + (m1 - m0) * (tokens - t0) / (t1 - t0)
