"""The alignment's cross-entropy over the whole sequence (``Align(ce_on="all")``, the AtSpeed authors' setting).

One teacher-forced draft forward over ``[BOS] prompt identifier EOS`` (left-padded prompts, the ground truth's codes
and EOS appended), every token after BOS a label: the prompt's tokens, the identifier's L codes and EOS. The mean is
over all those label tokens of the batch, pooled (as Hugging Face's shifted ``CrossEntropyLoss``), so longer prompts
weigh more. The default ``ce_on="item"`` instead reads the L code positions of the alignment's own tree forward.
"""

from __future__ import annotations

import torch

from atspeed.decoding.cache.tree_attention import prompt_positions


def sequence_ce(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over every real token after the first (BOS) of ``input_ids`` [B, P] (left-padded,
    ``attention_mask`` [B, P]) followed by ``response`` [B, R] (identifier codes and EOS) -> scalar."""
    ids = torch.cat([input_ids, response], 1)  # [B, T]
    mask = torch.cat([attention_mask.bool(), torch.ones_like(response, dtype=torch.bool)], 1)  # [B, T]
    logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=prompt_positions(mask)).logits
    labels = ids[:, 1:].masked_fill(~(mask[:, :-1] & mask[:, 1:]), -100)  # a label only after a real token
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100)
