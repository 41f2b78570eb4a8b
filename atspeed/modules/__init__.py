"""LightningModules: target SFT (and, in later stages, draft alignment and decoding)."""
