"""Search: the constrained beam step, beam search (ours and Hugging Face generate), drafting the token tree, keyed
noise."""
