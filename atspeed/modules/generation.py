"""Constrained top-K generation with Hugging Face ``generate``, mapped back to item positions.

This is the reference decoder used for evaluation during training (and the oracle of atspeed's own
decoders): beam search of width K, K returned sequences, exactly L new tokens, no length penalty.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from atspeed.items.trie import PrefixTrie


def hf_beam_search(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: PrefixTrie,
    num_beams: int,
    levels: int,
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``num_beams`` identifiers per left-padded prompt.

    Returns (items [B, K] item positions, -1 for an invalid identifier; scores [B, K] summed log-probs).
    """
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
    codes = out.sequences[:, prompt_len:]  # [B*K, L]
    items = trie.lookup(codes.cpu()).view(-1, num_beams)
    if num_beams > 1:
        return items, out.sequences_scores.cpu().view(-1, num_beams)
    # K = 1 is greedy search in generate, which reports no sequence scores: sum the chosen tokens' log-probs
    logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)  # [B, L, V]
    return items, logprobs.gather(2, codes[..., None]).sum(dim=(1, 2)).cpu()[:, None]
