"""Cache: every DynamicCache internal, the shared prompt header, tree-attention masks and forwards."""
