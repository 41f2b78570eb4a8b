"""Top-K ranking metrics (Recall@K, NDCG@K) over generated recommendation lists."""
