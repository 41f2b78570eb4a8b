"""Decoding: beam search, speculative strict/relaxed decoding with tree attention (pure tensor code); see DECODERS."""
