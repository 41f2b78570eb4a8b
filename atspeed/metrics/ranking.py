"""Recall@K and NDCG@K for generated top-K lists, through torchmetrics' retrieval metrics.

Binary relevance; a user can have several ground-truth items; IDCG runs over min(|ground truth|, K).
torchmetrics matches these formulas when each user's list is de-duplicated, scores strictly decrease
down the list, and every ground-truth item missing from the list is still passed (as relevant, with a
score below the whole list), so that recall's denominator is the full ground truth.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torchmetrics import MetricCollection
from torchmetrics.retrieval import RetrievalNormalizedDCG, RetrievalRecall


def retrieval_inputs(
    ranked: torch.Tensor, targets: Sequence[Sequence[int]], user_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten ranked lists into torchmetrics' (preds, target, indexes).

    ranked: [U, K] item positions, best first; -1 marks an empty slot. targets: U ground-truth lists.
    user_ids: [U] ids unique across the whole evaluation (all ranks), used as retrieval query ids.
    """
    preds, rel, idx = [], [], []
    for row, truth, uid in zip(ranked.tolist(), targets, user_ids.tolist(), strict=True):
        truth_set = set(truth)
        seen = [item for item in dict.fromkeys(row) if item >= 0]  # de-duplicated, order kept
        missing = [t for t in dict.fromkeys(truth) if t not in seen]
        n = len(seen)
        preds += [float(n - i) for i in range(n)] + [-1.0 - j for j in range(len(missing))]
        rel += [item in truth_set for item in seen] + [True] * len(missing)
        idx += [uid] * (n + len(missing))
    return torch.tensor(preds), torch.tensor(rel), torch.tensor(idx, dtype=torch.long)


class RankingMetrics(MetricCollection):
    """``recall@K`` and ``ndcg@K`` for each K; update with (ranked, targets, user_ids)."""

    def __init__(self, ks: Sequence[int], prefix: str = "") -> None:
        metrics = {}
        for k in ks:
            metrics[f"recall@{k}"] = RetrievalRecall(top_k=k)
            metrics[f"ndcg@{k}"] = RetrievalNormalizedDCG(top_k=k)
        super().__init__(metrics, prefix=prefix)

    def update_lists(self, ranked: torch.Tensor, targets: Sequence[Sequence[int]], user_ids: torch.Tensor) -> None:
        preds, rel, idx = retrieval_inputs(ranked, targets, user_ids)
        device = next(iter(self.values())).device
        self.update(preds.to(device), rel.to(device), indexes=idx.to(device))


def popularity_ranking(train: Sequence[Sequence[int]], k: int) -> torch.Tensor:
    """[k] the k most frequent training items (ties to the lower item position): the most-popular baseline."""
    counts = Counter(item for seq in train for item in seq)
    order = sorted(counts, key=lambda item: (-counts[item], item))[:k]
    return torch.tensor(order, dtype=torch.long)
