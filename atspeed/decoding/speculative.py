"""Speculative beam search: the draft proposes a token tree, the target verifies it in one forward.

One iteration for a batch of B requests (each at its own depth; SPEC section 5):

1. propose: the draft runs G = min(gamma, levels left) beam steps of width N from the target's K beams and their
   target scores (``draft_tree``);
2. verify: the target runs ONE forward over the K beams' newest tokens plus the tree (``tree_forward``);
3. accept: a verification rule (``strict``, ``relaxed``, ``recursive``) walks the levels on the device (``accept``):
   each row accepts m levels and gets K new beams at depth m + 1 (a correction, or the bonus step when all of its
   levels passed): m + 1 tokens per target call;
4. both caches keep only what the new beams attend (the accepted paths); finished requests leave the batch.

The draft goes first: the first iteration drafts from the root (the draft's prefill gives level 1), and the
target's first call takes the prompts together with that tree (``first_forward``), so the target has no prefill
call of its own: a list whose first tree holds the target's whole beam search (a perfect draft, gamma >= L)
costs one target call.

Host work: every shape the loop needs (rows still decoding, cache widths after compaction, the longest unfed
draft tail, levels left) and every counter comes back in ONE read-back per call (``read_back``), after the
verdict; nothing else in the loop waits for the device.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from atspeed.decoding import constants
from atspeed.decoding.cache import kv_cache
from atspeed.decoding.cache.header import PromptHeader, Prompts
from atspeed.decoding.cache.tree_attention import prefill
from atspeed.decoding.output import DecodeOutput, StageClock
from atspeed.decoding.planning.adaptive import BudgetPlanner
from atspeed.decoding.readback import Counters, Seen, read_back
from atspeed.decoding.search import keyed
from atspeed.decoding.search.beam import BeamState, Grid, extend, plain_grid, root_state, select_sample, select_top
from atspeed.decoding.search.draft_tree import NodeTable, Select, TokenTree, draft_tree, within_budget
from atspeed.decoding.settings import DecodeSettings
from atspeed.decoding.verification.accept import Verdict, beam_step, decide, needed
from atspeed.decoding.verification.tree_forward import first_forward, verify_forward
from atspeed.decoding.verification.verify import VerifyLevel
from atspeed.items.trie import PrefixTrie


@dataclass(frozen=True)
class DecodeOutputBuffer:
    """Finished lists, filled as requests leave the batch: [B, K, L] and [B, K]."""

    sequences: torch.Tensor
    scores: torch.Tensor

    @classmethod
    def empty(cls, b: int, k: int, levels: int, device: torch.device) -> DecodeOutputBuffer:
        return cls(torch.zeros(b, k, levels, dtype=torch.long, device=device), torch.zeros(b, k, device=device))


def _retire(
    going: int, levels: int, rows: torch.Tensor, beams: tuple[BeamState, BeamState], caches, out: DecodeOutputBuffer
) -> tuple[torch.Tensor, tuple[BeamState, BeamState]]:
    """Copy finished rows' beams to ``out`` and drop them from the batch (states and both caches); ``going``, the
    number of rows still decoding, is known on the host, so the split needs no read-back."""
    t_beams, d_beams = beams
    order = torch.sort((t_beams.depth >= levels).long(), stable=True).indices  # going rows first, in order
    done, kept = order[going:], order[:going]
    out.sequences[rows[done]] = t_beams.sequences[done, :, : out.sequences.shape[2]]
    out.scores[rows[done]] = t_beams.list_scores[done]
    for cache in caches:
        kv_cache.select_rows(cache, kept)
    return rows[kept], (t_beams.select_rows(kept), d_beams.select_rows(kept))


def _compact(cache: DynamicCache, beams: BeamState, width: int) -> BeamState:
    """Keep only the ``width`` cache positions (at most) some beam attends; re-express ``visible`` over them."""
    index, kept = kv_cache.keep_index(beams.visible.any(1), width)
    kv_cache.gather_positions(cache, index)
    return beams.gather_visible(index, kept)


def _advance(
    t_beams: BeamState,
    d_beams: BeamState,
    verdict: Verdict,
    table: NodeTable,
    node_visible: torch.Tensor,
    g: int,
    trie: PrefixTrie,
    tree_keys: keyed.TreeKeys | None,
) -> tuple[BeamState, BeamState]:
    """The new beams: parent node (depth + accepted) + token, except rows already complete; the draft's view of the
    same beams differs only in what they attend in its cache and in how much of them it has fed. Keyed beams
    (``tree_keys``) also carry their log-probabilities and their requests' keys."""
    depth = t_beams.depth + verdict.accepted
    view = dataclasses.replace(
        table.as_beams(node_visible, depth, t_beams.prompt_lengths), noise_keys=t_beams.noise_keys
    )
    log_probs = None
    if tree_keys is not None:
        log_probs = tree_keys.new_log_probs(verdict.nodes, verdict.tokens, verdict.scores, ~verdict.complete)
    new = extend(view, verdict.nodes, verdict.tokens, verdict.scores, trie, grow=~verdict.complete, log_probs=log_probs)
    return new, dataclasses.replace(
        new,
        visible=table.draft_visible[constants.column(depth.shape[0], depth.device), verdict.nodes],
        # the draft never fed its last drafted level; with nothing drafted, it fed what it had fed
        fed=depth - verdict.accepted // g if g else d_beams.fed,  # accepted // g: 1 where all g levels passed
    )  # fmt: skip


@dataclass
class _Loop:
    """The loop's state between calls: both models' beams and caches, the rows still decoding and what the host
    knows of them."""

    t_beams: BeamState
    d_beams: BeamState
    caches: list[DynamicCache]
    rows: torch.Tensor  # [B'] original index of each row still decoding (device)
    host_rows: list[int]
    prefilled: bool = False
    seen: Seen | None = None

    def next_call(self, levels: int, out: DecodeOutputBuffer) -> int:
        """Retire finished rows, compact both caches; the most levels any row has left (0: all done)."""
        seen = self.seen
        if seen is None:
            return levels
        going = seen.going
        if not all(going):
            self.rows, (self.t_beams, self.d_beams) = _retire(
                sum(going), levels, self.rows, (self.t_beams, self.d_beams), self.caches, out
            )
            self.host_rows = [r for r, go in zip(self.host_rows, going, strict=True) if go]
        if not self.host_rows:
            return 0
        self.t_beams = _compact(self.caches[0], self.t_beams, seen.widest(seen.target_kept))
        if self.prefilled:
            self.d_beams = _compact(self.caches[1], self.d_beams, seen.widest(seen.draft_kept))
        return levels - min(d for d, go in zip(seen.depth, going, strict=True) if go)

    def draft_prefill(self, draft: torch.nn.Module, prompts: Prompts) -> torch.Tensor:
        """The draft's prefill of the rows still decoding: its logits [B', V] give level 1."""
        rest = prompts.select(self.rows)
        self.caches[1] = rest.cache(draft, len(self.host_rows))
        self.prefilled = True
        return prefill(draft, self.caches[1], rest.input_ids, rest.mask, rest.past)


@dataclass(frozen=True)
class _Run:
    """What every call of one decode uses: the models, the trie, the settings and the rules."""

    target: torch.nn.Module
    draft: torch.nn.Module
    trie: PrefixTrie
    settings: DecodeSettings
    verify_level: VerifyLevel
    select: Select
    sample: bool
    generator: torch.Generator | None
    clock: StageClock
    grid: Grid = plain_grid  # how the draft scores extensions (``keyed.beam_grid``: keyed Gumbel keys)
    keyed: bool = False  # the target ranks by keyed Gumbel keys too (``keyed.TreeKeys``)

    def call(self, loop: _Loop, prompts: Prompts, g: int, m: int) -> tuple[TokenTree, Verdict, int]:
        """One target call: propose ``g`` levels (``m`` verified nodes at most), verify, accept; the loop's beams
        advance. Returns the tree, the verdict and the draft forwards it took."""
        s, first = self.settings, loop.seen is None
        self.clock.switch("draft")
        root_logits = loop.draft_prefill(self.draft, prompts) if g and not loop.prefilled else None
        drafts = g - int(first and g > 0) + int(root_logits is not None)  # the first prefill gives level 1
        tree, table = draft_tree(
            self.draft, loop.caches[1], loop.d_beams, self.trie, s.draft_beams, g, self.select,
            keep_distributions=self.sample, root_logits=root_logits if first else None,
            longest_unfed=loop.seen.widest(loop.seen.draft_unfed) if loop.seen else 0, grid=self.grid,
        )  # fmt: skip
        tree = within_budget(tree, m, by_score=not self.sample)
        self.clock.switch("verify")
        if first:
            logits, node_visible = first_forward(self.target, loop.caches[0], prompts, tree)
        else:
            logits, node_visible = verify_forward(self.target, loop.caches[0], loop.t_beams, tree)
        tree_keys = keyed.TreeKeys.build(logits, tree, table, loop.t_beams, self.trie) if self.keyed else None
        on_tree = tree_keys.grid if tree_keys is not None else None
        if g:
            verdict = decide(logits, tree, table, loop.t_beams, s.levels, self.trie, self.verify_level,
                             self.generator, on_tree)  # fmt: skip
        else:  # nothing drafted: the target's own beam step (what every rule's bonus step is)
            verdict = beam_step(logits[:, : s.num_beams], loop.t_beams, self.trie, self.select, on_tree)
        self.clock.switch("other")
        loop.t_beams, loop.d_beams = _advance(loop.t_beams, loop.d_beams, verdict, table, node_visible, g, self.trie,
                                              tree_keys)  # fmt: skip
        return tree, verdict, drafts


def speculative_decode(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: PrefixTrie,
    settings: DecodeSettings,
    verify_level: VerifyLevel,
    sample: bool = False,
    generator: torch.Generator | None = None,
    planner: BudgetPlanner | None = None,
    header: PromptHeader | None = None,
    synced_clock: bool = False,
    noise_keys: torch.Tensor | None = None,
) -> DecodeOutput:
    """Top-K identifiers of L tokens per left-padded prompt [B, P], N beams drafted gamma deep (``settings``).

    Each call verifies at most ``settings.budget`` drafted nodes (None: all; 0: plain beam steps, nothing drafted);
    with ``budget="auto"``, what the ``planner`` plans from the calls it has observed (``adaptive``). A ``header``
    that has learned the prompts' shared header puts its cached keys/values in both caches instead of recomputing it.
    ``synced_clock`` waits for the device at each stage switch (the benchmark's stage split). ``noise_keys`` [B]
    (``keyed.request_keys``): both models rank by keyed Gumbel keys and ``verify_level`` is strict: the lists are
    the target's keyed stochastic beam search (``keyed``).
    """
    num_beams, levels, draft_beams, gamma = settings.num_beams, settings.levels, settings.draft_beams, settings.gamma
    budget = None if settings.budget == "auto" else settings.budget
    if sample and generator is None:
        raise ValueError("relaxed (sampling) decoding needs a generator")
    b, device = input_ids.shape[0], input_ids.device
    select = functools.partial(select_sample, generator=generator) if sample else select_top
    clock = StageClock(device, sync=synced_clock)
    prompts = header.split(input_ids, attention_mask) if header is not None else Prompts(input_ids, attention_mask)
    # neither model has seen the prompts: the target's first call takes them with the first tree (first_forward);
    # the draft prefills when it first drafts (never, while a budget of 0 keeps to plain beam steps)
    root = root_state(prompts.visible, levels + gamma + 1, width=num_beams)
    root, grid = (root, plain_grid) if noise_keys is None else (keyed.keyed_root(root, noise_keys), keyed.beam_grid)
    loop = _Loop(root, root, [prompts.cache(target, b), kv_cache.new_cache()], torch.arange(b, device=device),
                 list(range(b)))  # fmt: skip
    out = DecodeOutputBuffer.empty(b, num_beams, levels, device)
    run = _Run(
        target, draft, trie, settings, verify_level, select, sample, generator, clock, grid, noise_keys is not None
    )
    count = Counters([0] * b, [0] * b, [0] * b)
    depth_before = [0] * b
    while left := loop.next_call(levels, out):
        m = next(b for b in (planner.plan() if planner is not None else budget, gamma * draft_beams) if b is not None)
        tree, verdict, drafts = run.call(loop, prompts, min(gamma, left) if m != 0 else 0, m)
        need = needed(tree, verdict, not sample) if planner is not None and tree.levels else None
        loop.seen = read_back(loop.t_beams, loop.d_beams, verdict, tree, need, levels)
        count.record(loop.host_rows, drafts, loop.seen, drafted=tree.levels > 0)
        if need is not None:  # a beam step always gains one token: nothing to learn
            accepted = torch.tensor(loop.seen.accepted)
            remaining = torch.tensor([levels - depth_before[r] for r in loop.host_rows])
            planner.observe(m, accepted, loop.seen.needed, remaining)
        for i, row in enumerate(loop.host_rows):
            depth_before[row] = loop.seen.depth[i]
    scores, order = out.scores.sort(dim=1, descending=True, stable=True)
    sequences = out.sequences.gather(1, order[..., None].expand_as(out.sequences))
    return DecodeOutput(sequences, scores, clock.stats(*count.tensors()))
