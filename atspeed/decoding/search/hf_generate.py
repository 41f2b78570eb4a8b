"""Hugging Face ``generate`` constrained beam search, as a decoder: the independent oracle and the baseline.

Beam search of width K, K returned sequences, exactly L new tokens, no length penalty, the trie through
``prefix_allowed_tokens_fn``. ``generate`` runs every beam's copy of the prompt (B x K rows) through the model.
"""

from __future__ import annotations

import time

import torch

from atspeed.decoding.output import DecodeOutput, DecodeStats
from atspeed.items.trie import PrefixTrie


def hf_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: PrefixTrie,
    num_beams: int,
    levels: int,
    pad_token_id: int,
) -> DecodeOutput:
    """Top-``num_beams`` identifiers [B, K, L] and summed log-probabilities [B, K] from ``model.generate``."""
    start = time.perf_counter()
    prompt_len = input_ids.shape[1]

    def allowed(_batch_id: int, sequence: torch.Tensor) -> list[int]:
        return trie.allowed_tokens(sequence[prompt_len:].tolist())

    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        num_beams=num_beams,
        num_return_sequences=num_beams,
        max_new_tokens=levels,
        min_new_tokens=levels,
        do_sample=False,
        length_penalty=0.0,
        early_stopping=True,
        prefix_allowed_tokens_fn=allowed,
        pad_token_id=pad_token_id,
        return_dict_in_generate=True,
        output_scores=num_beams > 1,
        output_logits=num_beams == 1,
    )
    b = input_ids.shape[0]
    codes = out.sequences[:, prompt_len:]  # [B*K, L]
    if num_beams > 1:
        scores = out.sequences_scores.float()
    else:  # K = 1 is greedy search in generate, which reports no sequence scores: sum the tokens' log-probs
        logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)  # [B, L, V]
        scores = logprobs.gather(2, codes[..., None]).sum(dim=(1, 2))
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize()
    calls = torch.full((b,), levels, dtype=torch.long)
    stats = DecodeStats(calls, torch.zeros_like(calls), torch.zeros(0, dtype=torch.long), 0.0,
                        time.perf_counter() - start, 0.0)  # fmt: skip
    return DecodeOutput(codes.reshape(b, num_beams, levels), scores.view(b, num_beams), stats)
