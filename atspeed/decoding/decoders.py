"""The table of decoders, chosen by name: ``DECODERS`` maps each name to its ``DecoderSpec`` (its function, whether
it drafts, samples or reuses the shared prompt header, and its exactness contract); ``BoundDecoder`` runs one on
batches. Callers ask the row (``DECODERS[name].needs_draft``), never a list of names.

========================  ===============================================================================
``beam``                  the target's own beam search (packed rows; the reference)
``spec_strict``           speculative beam search, strict top-K verification (lossless: equals ``beam``)
``spec_relaxed``          the paper's relaxed verification (``relaxed``, AtSpeed-R): biased once N > 1 (README)
``spec_relaxed_exact``    speculative sampling beam search, recursive rejection sampling (``recursive``): keeps
                          the distribution of the target's sampling beam search exactly
``beam_sample``           the target's own sampling beam search (the baseline of the relaxed decoders)
``beam_sample_keyed``     the target's stochastic beam search with keyed Gumbel noise (``keyed``): K identifiers
                          drawn without replacement from the target's distribution, a function of the seed
``spec_keyed``            speculative beam search on the same keyed noise, strict verification of the target's
                          Gumbel keys: exactly ``beam_sample_keyed``'s lists for the same seed
``hf_beam``               Hugging Face ``generate`` beam search (the independent oracle / baseline)
========================  ===============================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from atspeed.decoding.cache.header import PromptHeader
from atspeed.decoding.cache.tree_attention import check_attention
from atspeed.decoding.checks import (
    check_context,
    check_levels,
    check_list_length,
    check_prompt_shapes,
    check_prompts,
    prompt_faults,
    vocab_size,
)
from atspeed.decoding.output import DecodeOutput
from atspeed.decoding.planning.adaptive import BudgetPlanner
from atspeed.decoding.planning.costs import forward_costs
from atspeed.decoding.search import keyed
from atspeed.decoding.search.beam_search import beam_search
from atspeed.decoding.search.hf_generate import hf_generate
from atspeed.decoding.settings import DecodeSettings
from atspeed.decoding.speculative import speculative_decode
from atspeed.decoding.verification import recursive, relaxed, strict
from atspeed.items.trie import PrefixTrie

DecoderName = Literal[
    "beam", "spec_strict", "spec_relaxed", "spec_relaxed_exact", "hf_beam", "beam_sample", "beam_sample_keyed",
    "spec_keyed",
]  # fmt: skip


def check_settings(name: DecoderName, settings: DecodeSettings) -> None:
    """Settings that only some decoders constrain."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; choose one of {sorted(DECODERS)}")
    if DECODERS[name].needs_draft and settings.draft_beams < settings.num_beams:
        raise ValueError(
            f"draft_beams (N = {settings.draft_beams}) must be >= num_beams (K = {settings.num_beams}): "
            "a level is accepted only if the target's K beams are among the N drafted"
        )


Decoder = Callable[["BoundDecoder", torch.Tensor, torch.Tensor, torch.Generator | None], DecodeOutput]


def _beam(d: BoundDecoder, input_ids, attention_mask, generator) -> DecodeOutput:
    s, trie = d.settings, d.trie.on(input_ids.device)
    return beam_search(d.target, input_ids, attention_mask, trie, s.num_beams, s.levels, header=d.header,
                       synced_clock=d.synced_clock)  # fmt: skip


def _beam_sample(d: BoundDecoder, input_ids, attention_mask, generator) -> DecodeOutput:
    s, trie = d.settings, d.trie.on(input_ids.device)
    return beam_search(d.target, input_ids, attention_mask, trie, s.num_beams, s.levels, sample=True,
                       generator=generator, header=d.header, synced_clock=d.synced_clock)  # fmt: skip


def _beam_sample_keyed(d: BoundDecoder, input_ids, attention_mask, generator) -> DecodeOutput:
    s, trie = d.settings, d.trie.on(input_ids.device)
    return beam_search(d.target, input_ids, attention_mask, trie, s.num_beams, s.levels, header=d.header,
                       synced_clock=d.synced_clock, noise_keys=d.noise_keys(input_ids))  # fmt: skip


def _spec(verify, sample: bool, keys: bool = False) -> Decoder:
    def run(d: BoundDecoder, input_ids, attention_mask, generator) -> DecodeOutput:
        s, trie = d.settings, d.trie.on(input_ids.device)
        noise_keys = d.noise_keys(input_ids) if keys else None
        if d.planner is not None and d.planner.beam_list(s.levels):  # the plan is beam steps for the whole list
            out = beam_search(d.target, input_ids, attention_mask, trie, s.num_beams, s.levels, sample=sample,
                              generator=generator, header=d.header, synced_clock=d.synced_clock,
                              noise_keys=noise_keys)  # fmt: skip
            none = torch.zeros_like(out.stats.target_calls)
            return dataclasses.replace(out, stats=dataclasses.replace(out.stats, verified_nodes=none))
        return speculative_decode(
            d.target, d.draft, input_ids, attention_mask, trie, d.settings, verify, sample=sample,
            generator=generator, planner=d.planner, header=d.header, synced_clock=d.synced_clock,
            noise_keys=noise_keys,
        )  # fmt: skip

    return run


def _hf(d: BoundDecoder, input_ids, attention_mask, generator) -> DecodeOutput:
    s = d.settings
    trie = d.trie.on(torch.device("cpu"))  # generate asks it for each beam's allowed tokens as Python lists
    return hf_generate(d.target, input_ids, attention_mask, trie, s.num_beams, s.levels, s.pad_token_id)


@dataclass(frozen=True)
class DecoderSpec:
    """A row of ``DECODERS``: what a decoder is and promises. Callers read these fields, never lists of names."""

    fn: Decoder  # (bound decoder, input_ids [B, P], attention_mask [B, P], generator) -> DecodeOutput
    needs_draft: bool  # drafts with a second model (N, gamma and the budget apply; check_models checks the pair)
    samples: bool  # draws from a generator (seeded from settings.seed): lists differ from seed to seed
    uses_shared_header: bool  # reuses the batch's common prompt prefix (``PromptHeader``) across its forwards
    contract: str  # what its lists are guaranteed to be, against the reference
    help: str  # one line for --help

    @property
    def equals(self) -> str | None:
        """The decoder whose lists this one's equal exactly (a contract "equals <name>"), else None."""
        return self.contract.removeprefix("equals ") if self.contract.startswith("equals ") else None

    @property
    def deterministic(self) -> bool:
        """Its lists are a function of the prompts (the decoders whose lists can be compared with HF generate's)."""
        return not self.samples


DECODERS: dict[DecoderName, DecoderSpec] = {
    "beam": DecoderSpec(_beam, False, False, True, "reference", "the target's own beam search (packed rows)"),
    "spec_strict": DecoderSpec(_spec(strict.verify_level, sample=False), True, False, True, "equals beam",
                               "speculative beam search, strict top-K verification (lossless)"),
    "spec_relaxed": DecoderSpec(_spec(relaxed.verify_level, sample=True), True, True, True, "biased",
                                "the paper's relaxed verification (AtSpeed-R): biased once N > 1"),
    "spec_relaxed_exact": DecoderSpec(_spec(recursive.verify_level, sample=True), True, True, True,
                                      "samples beam_sample's distribution",
                                      "speculative sampling beam search, recursive rejection sampling"),
    "hf_beam": DecoderSpec(_hf, False, False, False, "equals beam",
                           "Hugging Face generate beam search (the independent oracle and baseline)"),
    "beam_sample": DecoderSpec(_beam_sample, False, True, True, "reference",
                               "the target's own sampling beam search (what relaxed decoding is measured against)"),
    "beam_sample_keyed": DecoderSpec(_beam_sample_keyed, False, True, True, "reference",
                                     "the target's stochastic beam search, its noise keyed by seed, request, prefix"),
    "spec_keyed": DecoderSpec(_spec(strict.verify_level, sample=False, keys=True), True, True, True,
                              "equals beam_sample_keyed",
                              "speculative beam search on the same keyed noise, strict verification of Gumbel keys"),
}  # fmt: skip
assert set(DECODERS) == set(get_args(DecoderName))


def check_models(name: DecoderName, target: torch.nn.Module, draft: torch.nn.Module | None, trie: PrefixTrie) -> None:
    """Fail before decoding when the models cannot work together or with the trie."""
    width = vocab_size(target)
    if trie.vocab_size > width:
        raise ValueError(f"the trie spans {trie.vocab_size} token ids but the target's vocabulary has {width}")
    if DECODERS[name].needs_draft:
        if draft is None:
            raise ValueError(f"decoder {name} needs a draft model")
        if vocab_size(draft) != width:
            raise ValueError(
                f"draft and target vocabularies differ ({vocab_size(draft)} vs {width} tokens): "
                "the draft must share the target's tokenizer and identifier tokens"
            )


class BoundDecoder:
    """Decoder ``name`` bound to its models, trie and settings, for many batches.

    What does not depend on the batch (settings, K against the trie's items, the models against each other and the
    trie) is checked once here;
    a call checks only its prompts (one host sync) and their length against both contexts. A sampling decoder draws
    from one generator across calls (seeded from ``settings.seed`` unless given). With ``budget="auto"`` the first
    speculative call measures the cost model (``costs.forward_costs``, after its first prompt) and the planner then
    keeps what every later call accepted (``adaptive``). The trie may live on any device: each call decodes with a
    copy on its prompts' device, made once per device (``PrefixTrie.on``). A model whose attention implementation
    cannot read the 4D tree mask is switched to ``sdpa`` here (``check_attention``).
    """

    def __init__(
        self,
        name: DecoderName,
        target: torch.nn.Module,
        trie: PrefixTrie,
        settings: DecodeSettings,
        draft: torch.nn.Module | None = None,
        generator: torch.Generator | None = None,
        share_header: bool = True,
        synced_clock: bool = False,
    ) -> None:
        check_settings(name, settings)
        check_levels(settings, trie)
        check_list_length(settings.num_beams, trie.num_items, "num_beams")  # else -inf filler rows that are no items
        check_models(name, target, draft, trie)
        self.name, self.target, self.trie, self.settings = name, target, trie, settings
        self.spec = DECODERS[name]
        self.draft = draft if self.spec.needs_draft else None
        for model in (target, self.draft):
            if model is not None:
                check_attention(model)
        self.generator = generator
        self.planner: BudgetPlanner | None = None
        self.header = PromptHeader() if share_header and self.spec.uses_shared_header else None
        self.synced_clock = synced_clock  # wait for the device at every stage switch (benchmarks' stage split)
        self.requests_seen = 0  # requests decoded so far: the keyed decoders number requests in this order

    def _check_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Check the prompts and let the header learn from them: one host sync per batch for both."""
        check_prompt_shapes(input_ids, attention_mask)
        facts = [prompt_faults(attention_mask)]
        if self.header is not None:
            facts.append(self.header.common_length(input_ids, attention_mask))
        values = torch.stack(facts).tolist()
        check_prompts(input_ids, attention_mask, bad=values[0])
        if self.header is not None:
            self.header.shrink(values[1], input_ids.shape[0])

    def _plan(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """With budget auto, build the planner on the first batch (cost model measured after its first prompt)."""
        s = self.settings
        if s.budget != "auto" or not self.spec.needs_draft or self.planner is not None:
            return
        prompt = input_ids[0][attention_mask[0].bool()].tolist()
        grid = BudgetPlanner.budgets(s.num_beams, s.draft_beams, s.gamma)
        target_ms = forward_costs(self.target, prompt, sorted({s.num_beams + m for m in grid}))
        draft_ms = forward_costs(self.draft, prompt, [s.draft_beams])
        self.planner = BudgetPlanner(s.num_beams, s.draft_beams, s.gamma, target_ms, draft_ms)

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> DecodeOutput:
        """Decode a batch of left-padded prompts [B, P] (no gradients); ``generator`` overrides the bound one."""
        self._check_batch(input_ids, attention_mask)
        check_context(self.target, input_ids.shape[1], self.settings.levels)
        if self.draft is not None:
            check_context(self.draft, input_ids.shape[1], self.settings.levels, "draft")
        if generator is None and self.spec.samples:
            if self.generator is None:
                self.generator = torch.Generator(device=input_ids.device).manual_seed(self.settings.seed)
            generator = self.generator
        # no_grad, not inference_mode: under ZeRO-3 (alignment's validation) parameters gathered here would turn
        # into inference tensors that the next training step cannot use
        with torch.no_grad():
            self._plan(input_ids, attention_mask)
            out = self.spec.fn(self, input_ids, attention_mask, generator)
        self.requests_seen += input_ids.shape[0]
        return out

    def noise_keys(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B] keys of the batch's requests for the keyed decoders: (seed, request number), requests numbered in the
        order this decoder sees them, so a list does not depend on how the requests are batched."""
        numbers = self.requests_seen + torch.arange(input_ids.shape[0], device=input_ids.device)
        return keyed.request_keys(self.settings.seed, numbers)


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
    """Decode one batch of left-padded prompts [B, P] with decoder ``name`` (a ``BoundDecoder`` used once)."""
    return BoundDecoder(name, target, trie, settings, draft, generator)(input_ids, attention_mask)
