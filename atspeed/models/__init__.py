"""Build or load target and draft causal LMs, their tokenizers, and LoRA adapters."""
