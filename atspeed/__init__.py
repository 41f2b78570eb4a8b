"""atspeed: fast LLM-based generative recommendation (aligned drafts + speculative beam decoding)."""

__version__ = "0.1.0"
