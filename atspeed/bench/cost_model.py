"""The benchmark's side of the cost model (``atspeed.decoding.planning.costs`` measures it): tree sizes to measure, the
ms per list a row's call counts predict, and the table."""

from __future__ import annotations

from collections.abc import Sequence

from atspeed.decoding.decoders import DECODERS
from atspeed.decoding.planning.costs import forward_costs, ms_at
from atspeed.tables import markdown_table

__all__ = ["cost_table", "forward_costs", "predicted_ms_per_list", "tree_sizes"]


def tree_sizes(ks: Sequence[int], draft_beams: Sequence[int], gammas: Sequence[int]) -> list[int]:
    """1, the beam widths K and N, and every verified tree K + gamma * N of the grid, sorted."""
    sizes = {1, *ks, *draft_beams}
    sizes |= {k + g * n for k in ks for n in draft_beams for g in gammas if n >= k}
    return sorted(sizes)


def predicted_ms_per_list(row: dict, target: dict[str, float], draft: dict[str, float], levels: int) -> float | None:
    """What a batch-1 list should cost from the forward costs and the row's own call counts (None for rows the
    model does not cover: batches > 1, HF generate).

    beam / beam_sample(_keyed): the target's prefill, then L - 1 forwards of K tokens. spec_*: the draft's prefill and a
    forward of N tokens per further draft call; the target's first call reads the prompt and the first tree in one
    forward, counted as the prefill plus a tree forward less a 1-token forward (what appending the tree to the
    prefill adds, without a second call's fixed cost); every call verifies K + the row's mean verified drafted nodes
    per call (K + gamma x N when the row does not say).
    """
    if row["batch_size"] != 1 or row["decoder"] == "hf_beam":
        return None
    k = row["K"]
    if not DECODERS[row["decoder"]].needs_draft:
        return target["prefill"] + (levels - 1) * ms_at(target, k)
    verified = row.get("verified_nodes_per_call")
    tree = k + (row["gamma"] * row["N"] if verified is None else verified)
    return (
        target["prefill"] - ms_at(target, 1) + row["target_calls_per_list"] * ms_at(target, tree)
        + draft["prefill"] + (row["draft_calls_per_list"] - 1) * ms_at(draft, row["N"])
    )  # fmt: skip


def cost_table(costs: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per model, one column per token count (ms per forward)."""
    columns = list(next(iter(costs.values())))
    header = ["model", *(f"{c} tokens" if c != "prefill" else "prefill" for c in columns)]
    return markdown_table(header, ([name, *(f"{row[c]:.2f}" for c in columns)] for name, row in costs.items()))
