"""Turn (history, target) samples into padded token batches: right-padded for training, left for generation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from atspeed.data.prompts import render_prompt
from atspeed.items.index import ItemIndex

IGNORE = -100


@dataclass(frozen=True)
class PromptEncoder:
    """Encodes requests as ``[BOS] prompt`` token ids and targets as ``identifier EOS``."""

    tokenizer: PreTrainedTokenizerBase
    index: ItemIndex
    item_token_ids: torch.Tensor  # [I, L]
    template: str
    max_history: int

    def prompts(self, histories: Sequence[Sequence[int]]) -> list[list[int]]:
        texts = [render_prompt(self.template, [self.index.codes[i] for i in h], self.max_history) for h in histories]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        return [([bos] if bos is not None else []) + ids for ids in encoded]

    def response(self, item: int) -> list[int]:
        return [*self.item_token_ids[item].tolist(), self.tokenizer.eos_token_id]


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool) -> torch.Tensor:
    """[len(rows), longest] padded with ``value`` on the left (generation) or the right (training)."""
    tensors = [torch.tensor(row, dtype=torch.long) for row in rows]
    return pad_sequence(tensors, batch_first=True, padding_value=value, padding_side="left" if left else "right")


@dataclass(frozen=True)
class TrainCollator:
    """(history, target item) pairs -> input_ids / attention_mask / labels, right-padded.

    ``labels`` cover the response (identifier and EOS tokens) only; prompt and padding are ``IGNORE``.
    """

    encoder: PromptEncoder

    def __call__(self, pairs: Sequence[tuple[Sequence[int], int]]) -> dict[str, torch.Tensor]:
        prompts = self.encoder.prompts([h for h, _ in pairs])
        responses = [self.encoder.response(t) for _, t in pairs]
        seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
        pad = self.encoder.tokenizer.pad_token_id
        labels = [[IGNORE] * len(p) + r for p, r in zip(prompts, responses, strict=True)]
        return {
            "input_ids": _pad(seqs, pad, left=False),
            "attention_mask": _pad([[1] * len(s) for s in seqs], 0, left=False),
            "labels": _pad(labels, IGNORE, left=False),
        }


@dataclass(frozen=True)
class EvalCollator:
    """Evaluation requests -> left-padded prompts plus the ground truth, for generation."""

    encoder: PromptEncoder

    def __call__(self, samples: Sequence[tuple[int, Sequence[int], Sequence[int]]]) -> dict:
        prompts = self.encoder.prompts([h for _, h, _ in samples])
        return {
            "input_ids": _pad(prompts, self.encoder.tokenizer.pad_token_id, left=True),
            "attention_mask": _pad([[1] * len(p) for p in prompts], 0, left=True),
            "request_ids": torch.tensor([rid for rid, _, _ in samples], dtype=torch.long),
            "targets": [list(t) for _, _, t in samples],
        }
