"""The table of decoders, chosen by name (``DECODERS``), and the settings they share.

========================  ===============================================================================
``beam``                  the target's own beam search (packed rows; the reference)
``spec_strict``           speculative beam search, strict top-K verification (lossless: equals ``beam``)
``spec_relaxed``          speculative sampling beam search, relaxed verification (faster, approximate)
``hf_beam``               Hugging Face ``generate`` beam search (the independent oracle / baseline)
========================  ===============================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from atspeed.decoding import relaxed, strict
from atspeed.decoding.beam_search import beam_search
from atspeed.decoding.hf_generate import hf_generate
from atspeed.decoding.output import DecodeOutput
from atspeed.decoding.speculative import speculative_decode
from atspeed.errors import DataError
from atspeed.items.trie import PrefixTrie

DecoderName = Literal["beam", "spec_strict", "spec_relaxed", "hf_beam", "beam_sample"]
SPECULATIVE: tuple[DecoderName, ...] = ("spec_strict", "spec_relaxed")
SAMPLING: tuple[DecoderName, ...] = ("spec_relaxed", "beam_sample")  # seeded from settings.seed


@dataclass(frozen=True)
class DecodeSettings:
    """K, L and, for the speculative decoders, N and gamma; checked at construction."""

    num_beams: int  # K: list length
    levels: int  # L: identifier tokens per item
    draft_beams: int = 40  # N: draft beams per step
    gamma: int = 3  # draft steps per target call
    pad_token_id: int = 0
    seed: int = 0  # of the sampling decoders (spec_relaxed, beam_sample)

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams (K) must be >= 1, got {self.num_beams}")
        if self.levels < 1:
            raise ValueError(f"levels (L) must be >= 1, got {self.levels}")
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")
        if self.draft_beams < 1:
            raise ValueError(f"draft_beams (N) must be >= 1, got {self.draft_beams}")


def check_settings(name: DecoderName, settings: DecodeSettings) -> None:
    """Settings that only some decoders constrain."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; choose one of {sorted(DECODERS)}")
    if name in SPECULATIVE and settings.draft_beams < settings.num_beams:
        raise ValueError(
            f"draft_beams (N = {settings.draft_beams}) must be >= num_beams (K = {settings.num_beams}): "
            "a level is accepted only if the target's K beams are among the N drafted"
        )


Decoder = Callable[
    [torch.nn.Module, torch.nn.Module | None, torch.Tensor, torch.Tensor, PrefixTrie, DecodeSettings, torch.Generator],
    DecodeOutput,
]


def _beam(target, draft, input_ids, attention_mask, trie, s: DecodeSettings, generator) -> DecodeOutput:
    return beam_search(target, input_ids, attention_mask, trie, s.num_beams, s.levels)


def _beam_sample(target, draft, input_ids, attention_mask, trie, s: DecodeSettings, generator) -> DecodeOutput:
    return beam_search(target, input_ids, attention_mask, trie, s.num_beams, s.levels, sample=True, generator=generator)


def _spec(verify, sample: bool) -> Decoder:
    def run(target, draft, input_ids, attention_mask, trie, s: DecodeSettings, generator) -> DecodeOutput:
        return speculative_decode(
            target, draft, input_ids, attention_mask, trie, s.num_beams, s.levels, s.draft_beams, s.gamma,
            verify, sample=sample, generator=generator,
        )  # fmt: skip

    return run


def _hf(target, draft, input_ids, attention_mask, trie, s: DecodeSettings, generator) -> DecodeOutput:
    return hf_generate(target, input_ids, attention_mask, trie, s.num_beams, s.levels, s.pad_token_id)


DECODERS: dict[DecoderName, Decoder] = {
    "beam": _beam,
    "spec_strict": _spec(strict.verify_level, sample=False),
    "spec_relaxed": _spec(relaxed.verify_level, sample=True),
    "hf_beam": _hf,
    "beam_sample": _beam_sample,  # the target's own sampling beam search: what spec_relaxed is measured against
}
assert set(DECODERS) == set(get_args(DecoderName))


def vocab_size(model: torch.nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def check_models(name: DecoderName, target: torch.nn.Module, draft: torch.nn.Module | None, trie: PrefixTrie) -> None:
    """Fail before decoding when the models cannot work together or with the trie."""
    width = vocab_size(target)
    if trie.vocab_size > width:
        raise ValueError(f"the trie spans {trie.vocab_size} token ids but the target's vocabulary has {width}")
    if name in SPECULATIVE:
        if draft is None:
            raise ValueError(f"decoder {name} needs a draft model")
        if vocab_size(draft) != width:
            raise ValueError(
                f"draft and target vocabularies differ ({vocab_size(draft)} vs {width} tokens): "
                "the draft must share the target's tokenizer and identifier tokens"
            )


def check_inputs(settings: DecodeSettings, trie: PrefixTrie, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Settings that match the trie, and a non-empty left-padded prompt [B, P] for every request."""
    if settings.levels != trie.levels:
        raise ValueError(f"levels = {settings.levels}, but the trie's identifiers have {trie.levels} tokens")
    if input_ids.ndim != 2 or mask.shape != input_ids.shape:
        raise ValueError(f"prompts must be [B, P] with a mask of the same shape, got {tuple(input_ids.shape)} and "
                         f"{tuple(mask.shape)}")  # fmt: skip
    if input_ids.shape[1] and bool(mask.bool().any(1).all()):  # one host sync per batch, none per step
        return
    empty = (~mask.bool().any(1)).nonzero().flatten().tolist() if input_ids.shape[1] else list(range(len(input_ids)))
    raise ValueError(f"request {empty[0]} of the batch has an empty prompt ({len(empty)} empty in all)")


def check_list_length(k: int, num_items: int, key: str) -> None:
    """A top-``k`` list of distinct items needs at least ``k`` items in the index."""
    if k > num_items:
        raise DataError(f"{key}: K = {k} exceeds the {num_items} items of the index: lists hold distinct items")


def check_context(model, prompt_tokens: int, levels: int, what: str = "target") -> None:
    """Prompts of ``prompt_tokens`` plus ``levels`` identifier tokens must fit the context of ``model`` (a model,
    or its config alone, so the check can run before any weights load)."""
    limit = getattr(getattr(model, "config", model), "max_position_embeddings", None)
    if limit is not None and prompt_tokens + levels > limit:
        raise DataError(
            f"prompts of {prompt_tokens} tokens + {levels} identifier tokens exceed the {what}'s context of {limit} "
            "positions: lower data.max_history"
        )


def decode(
    name: DecoderName,
    target: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: PrefixTrie,
    settings: DecodeSettings,
    draft: torch.nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> DecodeOutput:
    """Decode a batch of left-padded prompts [B, P] with decoder ``name`` (checks first; no gradients)."""
    check_settings(name, settings)
    check_inputs(settings, trie, input_ids, attention_mask)
    check_models(name, target, draft, trie)
    check_context(target, input_ids.shape[1], settings.levels)
    if draft is not None and name in SPECULATIVE:
        check_context(draft, input_ids.shape[1], settings.levels, "draft")
    if generator is None and name in SAMPLING:
        generator = torch.Generator(device=input_ids.device).manual_seed(settings.seed)
    with torch.inference_mode():
        return DECODERS[name](target, draft, input_ids, attention_mask, trie, settings, generator)
