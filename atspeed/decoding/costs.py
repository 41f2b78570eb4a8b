"""Forward cost against tokens: what one target or draft call costs for a tree of t nodes after a cached prompt.

A CPU forward's cost grows with its tokens, a GPU's stays nearly flat up to a few hundred: this table, measured in
the same run as the decoding rows, says which regime the benchmark ran in and how large a verified tree can be before
it costs more than the target steps it saves (``budget="auto"`` plans every call with it). Each entry is the median
of ``repeats`` forwards of t tree tokens (a chain: each node attends the prompt and the nodes before it) appended to
one cached prompt, which is cropped back after each forward; the prefill of the prompt is timed the same way.
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


def ms_at(costs: dict[str, float], tokens: int) -> float:
    """ms of a forward of ``tokens`` tokens: the measured value, or linear between the nearest measured counts."""
    points = sorted((int(t), ms) for t, ms in costs.items() if t != "prefill")
    if str(tokens) in costs:
        return costs[str(tokens)]
    below = [p for p in points if p[0] < tokens] or points[:1]
    above = [p for p in points if p[0] > tokens] or points[-1:]
    (t0, m0), (t1, m1) = below[-1], above[0]
    return m0 if t1 == t0 else m0 + (m1 - m0) * (tokens - t0) / (t1 - t0)
