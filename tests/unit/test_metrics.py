"""Recall@K / NDCG@K through torchmetrics equal the exact formulas (several ground-truth items per user)."""

import math
import random

import pytest
import torch

from atspeed.metrics.ranking import RankingMetrics, popularity_ranking, retrieval_inputs


def exact(ranked: list[int], truth: list[int], k: int) -> tuple[float, float]:
    """Reference: binary relevance, IDCG over min(|truth|, k)."""
    top = ranked[:k]
    hits = [1.0 if item in truth else 0.0 for item in top]
    recall = sum(hits) / len(set(truth))
    dcg = sum(h / math.log2(i + 2) for i, h in enumerate(hits))
    idcg = sum(1 / math.log2(i + 2) for i in range(min(len(set(truth)), k)))
    return recall, dcg / idcg


def test_metrics_match_the_formulas_on_random_lists() -> None:
    rng = random.Random(0)
    ks = (1, 3, 5, 10)
    metrics = RankingMetrics(ks)
    ranked, truths = [], []
    for _ in range(50):
        ranked.append(rng.sample(range(40), 10))
        truths.append(rng.sample(range(40), rng.randint(1, 6)))
    metrics.update_lists(torch.tensor(ranked), truths, torch.arange(50))
    got = metrics.compute()
    for k in ks:
        rec = sum(exact(r, t, k)[0] for r, t in zip(ranked, truths, strict=True)) / 50
        ndcg = sum(exact(r, t, k)[1] for r, t in zip(ranked, truths, strict=True)) / 50
        assert float(got[f"recall@{k}"]) == pytest.approx(rec, abs=1e-6)
        assert float(got[f"ndcg@{k}"]) == pytest.approx(ndcg, abs=1e-6)


def test_missed_targets_count_in_the_recall_denominator() -> None:
    metrics = RankingMetrics([2])
    metrics.update_lists(torch.tensor([[5, 6]]), [[5, 9, 10]], torch.tensor([0]))
    assert float(metrics.compute()["recall@2"]) == pytest.approx(1 / 3)


def test_invalid_slots_and_repeats_are_dropped() -> None:
    preds, rel, idx = retrieval_inputs(torch.tensor([[3, -1, 3, 4]]), [[4]], torch.tensor([7]))
    assert preds.tolist() == [2.0, 1.0] and rel.tolist() == [False, True] and idx.tolist() == [7, 7]


def test_popularity_ranking_orders_by_count_then_item() -> None:
    assert popularity_ranking([[1, 2, 2], [3, 3, 1], [0]], 3).tolist() == [1, 2, 3]
