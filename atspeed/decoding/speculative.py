"""Speculative beam search: the draft proposes a token tree, the target verifies it in one forward.

One iteration for a batch of B requests (each at its own depth; SPEC section 5):

1. the draft runs G = min(gamma, levels left) beam steps of width N from the target's K beams and their target
   scores (``draft_tree``);
2. the target runs ONE forward over the K beams' newest tokens plus the tree (tree attention);
3. a verification rule (``strict`` or ``relaxed``) walks the levels: each row accepts m levels and gets K new beams
   at depth m + 1 (a correction, or the bonus step when all of its levels passed): m + 1 tokens per target call;
4. both caches keep only what the new beams attend (the accepted paths); finished requests leave the batch.

The draft goes first: the first iteration drafts from the root (the draft's prefill gives level 1), and the
target's first call takes the prompts together with that tree (``_first_forward``), so the target has no prefill
call of its own: a list whose first tree holds the target's whole beam search (a perfect draft, gamma >= L)
costs one target call.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from atspeed.decoding import kv_cache
from atspeed.decoding.adaptive import BudgetPlanner, needed_budgets
from atspeed.decoding.beam import BeamState, candidates, extend, root_state, select_sample, select_top
from atspeed.decoding.draft_tree import NodeTable, TokenTree, draft_tree, within_budget
from atspeed.decoding.header import PromptHeader, Prompts
from atspeed.decoding.output import DecodeOutput, StageClock
from atspeed.decoding.settings import DecodeSettings
from atspeed.decoding.tree_attention import forward_tree, prefill, prompt_positions
from atspeed.decoding.verify import LevelInput, VerifyLevel
from atspeed.items.trie import PrefixTrie


@dataclass(frozen=True)
class Verdict:
    """Per row: ``accepted`` levels m, then K new beams = node ``nodes`` + ``tokens`` (none where ``complete``)."""

    accepted: torch.Tensor  # [B]
    nodes: torch.Tensor  # [B, K] parent node ids (level m)
    tokens: torch.Tensor  # [B, K]
    scores: torch.Tensor  # [B, K]
    complete: torch.Tensor  # [B] the accepted nodes already hold all L tokens
    chosen: tuple[torch.Tensor, ...] = ()  # per drafted level g: [B, K] nodes chosen there (rows that accepted g)


def _select(selection, anc: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Restrict a forward to the selected nodes: ``anc`` [B, Q, Q] -> [B, R, R], each [B, Q, ...] -> [B, R, ...]."""
    if selection is None:
        return (anc, *rows)
    index, valid, _ = selection
    b, r = index.shape
    anc = anc.gather(1, index[..., None].expand(b, r, anc.shape[2])).gather(2, index[:, None, :].expand(b, r, r))
    picked = [x.gather(1, index.view(b, r, *[1] * (x.ndim - 2)).expand(b, r, *x.shape[2:])) for x in rows]
    return (anc & valid[:, None, :] & valid[:, :, None], *picked)


def _unselect(selection, logits: torch.Tensor, anc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every node [B, Q, V] (pruned ones: meaningless) and ``anc`` over the computed columns [B, Q, R]."""
    if selection is None:
        return logits, anc
    index, valid, slot = selection
    b, q = slot.shape
    logits = logits.gather(1, slot[..., None].expand(b, q, logits.shape[2]))
    return logits, anc.gather(2, index[:, None, :].expand(b, q, index.shape[1])) & valid[:, None, :]


def _verify_forward(
    target: torch.nn.Module, cache: DynamicCache, beams: BeamState, tree: TokenTree
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target logits at every tree node [B, Q, V] and what each node attends [B, Q, S + R] (R nodes computed:
    all Q, or the roots and the verified ones under a budget)."""
    if not bool((beams.depth - beams.fed == 1).all()):
        raise RuntimeError("target beams must have exactly one unfed token before verification")
    b, k, s = beams.visible.shape
    anc, root = tree.ancestry()  # [B, Q, Q], [B, Q]
    newest = beams.sequences.gather(2, (beams.depth - 1)[:, None, None].expand(b, k, 1))[..., 0]  # [B, K]
    tokens = torch.cat([newest, tree.tokens.reshape(b, -1)], dim=1)  # [B, Q]
    positions = (beams.prompt_lengths + beams.depth - 1)[:, None] + tree.node_levels()[None, :]
    past = beams.visible.gather(1, root[..., None].expand(b, tree.num_nodes, s))  # [B, Q, S]
    selection = tree.selection()
    tree_mask, tokens_r, positions_r, past_r = _select(selection, anc, tokens, positions, past)
    logits = forward_tree(target, cache, tokens_r, positions_r, past_r, tree_mask)
    logits, anc = _unselect(selection, logits, anc)
    return logits, torch.cat([past, anc], dim=2)


def _first_forward(
    target: torch.nn.Module, cache: DynamicCache, prompts: Prompts, tree: TokenTree
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first target call: the prompts [B, P] and the tree drafted from the root, in one forward.

    Prompt tokens attend the shared header (when ``prompts`` has one in the cache) and causally each other (padding
    excluded); tree nodes attend the whole prompt and their ancestors. The K roots are copies of the empty beam,
    i.e. the last prompt position. Returns what ``_verify_forward`` returns, over the cache the call leaves (the
    header, the prompts, then the computed drafted nodes).
    """
    input_ids, past = prompts.input_ids, prompts.past
    b, p = input_ids.shape
    k = tree.roots
    real = prompts.mask.bool()
    seen = prompts.visible  # [B, past + P]
    anc, _ = tree.ancestry()
    positions = (seen.long().sum(1) - 1)[:, None] + tree.node_levels()[None, :]
    tokens = torch.cat([input_ids[:, -1:].expand(b, k), tree.tokens.reshape(b, -1)], dim=1)
    selection = tree.selection()
    tree_mask, tokens, positions = _select(selection, anc, tokens, positions)
    # the roots are the prompt's last position: drop them from the forward, the prompt takes their place
    nodes, node_tree, node_positions = tokens[:, k:], tree_mask[:, k:, k:], positions[:, k:]
    t = nodes.shape[1]
    causal = torch.ones(p, p, dtype=torch.bool, device=real.device).tril()[None] & real[:, None, :]
    node_prompt = real[:, None, :].expand(b, t, p)
    allowed = torch.cat(
        [torch.cat([causal, causal.new_zeros(b, p, t)], dim=2), torch.cat([node_prompt, node_tree], dim=2)], dim=1
    )  # [B, P + T, P + T]; every token also attends the cached header
    logits = forward_tree(
        target, cache, torch.cat([input_ids, nodes], dim=1),
        torch.cat([past + prompt_positions(prompts.mask), node_positions], dim=1),
        real.new_ones(b, p + t, past), allowed, t + 1,
    )  # fmt: skip
    logits = torch.cat([logits[:, :1].expand(b, k, logits.shape[2]), logits[:, 1:]], dim=1)  # [B, R, V]
    logits, anc = _unselect(selection, logits, anc)
    # every node sees the header and the real prompt; among the computed columns, its drafted ancestors
    return logits, torch.cat([seen[:, None, :].expand(b, anc.shape[1], past + p), anc[:, :, k:]], dim=2)


def _decide(
    logits: torch.Tensor,
    tree: TokenTree,
    table: NodeTable,
    beams: BeamState,
    levels: int,
    trie: PrefixTrie,
    verify_level: VerifyLevel,
    generator: torch.Generator | None,
) -> Verdict:
    """Walk the tree level by level with ``verify_level`` until every row has stopped."""
    b, k = beams.scores.shape
    remaining = levels - beams.depth  # [B]
    reachable = remaining.clamp(max=tree.levels)
    current = torch.arange(k, device=logits.device).expand(b, k)
    scores, trie_states = beams.scores, beams.trie_states
    active = torch.ones(b, dtype=torch.bool, device=logits.device)
    verdict = Verdict(torch.zeros_like(remaining), current, torch.zeros_like(current), scores, ~active)
    chosen: list[torch.Tensor] = []
    for g in range(1, tree.levels + 2):
        if not bool(active.any()):
            break
        node_logits = logits.gather(1, current[..., None].expand(b, k, logits.shape[2]))  # [B, K, V]
        cand = candidates(node_logits, scores, trie_states, trie)
        d = verify_level(LevelInput(cand, current, g, active & (g <= reachable), tree, generator))
        ok = active & d.ok
        stop = (active & ~ok)[:, None]  # [B, 1]
        complete = stop[:, 0] & (remaining == g - 1)  # [B] nothing left to choose
        full = complete[:, None]
        verdict = Verdict(
            accepted=torch.where(stop[:, 0], g - 1, verdict.accepted),
            nodes=torch.where(stop, torch.where(full, current, current.gather(1, d.stop_parents)), verdict.nodes),
            tokens=torch.where(stop, d.stop_tokens, verdict.tokens),
            scores=torch.where(stop, torch.where(full, scores, d.stop_scores), verdict.scores),
            complete=verdict.complete | complete,
        )
        keep = ok[:, None]
        if g <= tree.levels:
            chosen.append(d.next_nodes)
        current = torch.where(keep, d.next_nodes, current)
        scores = torch.where(keep, d.next_scores, scores)
        trie_states = torch.where(keep, table.trie_states.gather(1, current), trie_states)
        active = ok
    return dataclasses.replace(verdict, chosen=tuple(chosen))


def _beam_step(logits: torch.Tensor, beams: BeamState, trie: PrefixTrie, select) -> Verdict:
    """The verdict of a call with an empty tree: K new beams chosen from the beams' next-token ``logits`` [B, K, V]."""
    b, k, vocab = logits.shape
    parents, tokens, scores = select(candidates(logits, beams.scores, beams.trie_states, trie), k, vocab)
    none = torch.zeros(b, dtype=torch.long, device=logits.device)
    return Verdict(none, parents, tokens, scores, none.bool())


def _needed(tree: TokenTree, verdict: Verdict, by_score: bool) -> torch.Tensor:
    """[B, G] budgets that would have kept each accepted depth (``adaptive.needed_budgets``)."""
    if tree.levels == 0:
        return tree.log_q.new_zeros(tree.log_q.shape[0], 0, dtype=torch.long)
    return needed_budgets(tree, list(verdict.chosen), by_score)


def _compact(cache: DynamicCache, beams: BeamState) -> BeamState:
    """Keep only the cache positions some beam attends; re-express ``visible`` over the kept ones."""
    index, kept = kv_cache.keep_index(beams.visible.any(1))
    kv_cache.gather_positions(cache, index)
    return beams.gather_visible(index, kept)


@dataclass(frozen=True)
class DecodeOutputBuffer:
    """Finished lists, filled as requests leave the batch: [B, K, L] and [B, K]."""

    sequences: torch.Tensor
    scores: torch.Tensor


def _retire(
    finished: torch.Tensor, rows: torch.Tensor, beams: tuple[BeamState, BeamState], caches, out: DecodeOutputBuffer
) -> tuple[torch.Tensor, tuple[BeamState, BeamState]]:
    """Copy finished rows' beams to ``out`` and drop them from the batch (states and both caches)."""
    t_beams, d_beams = beams
    done = finished.nonzero()[:, 0]
    out.sequences[rows[done]] = t_beams.sequences[done, :, : out.sequences.shape[2]]
    out.scores[rows[done]] = t_beams.scores[done]
    going = (~finished).nonzero()[:, 0]
    for cache in caches:
        kv_cache.select_rows(cache, going)
    return rows[going], (t_beams.select_rows(going), d_beams.select_rows(going))


@dataclass
class _Counters:
    """Per list: target calls, draft calls, drafted nodes verified; per verification (a call that drafted): the
    accepted depth."""

    target_calls: torch.Tensor
    draft_calls: torch.Tensor
    verified: torch.Tensor
    accepted: list[torch.Tensor]

    @classmethod
    def zeros(cls, b: int) -> _Counters:
        return cls(*(torch.zeros(b, dtype=torch.long) for _ in range(3)), [])

    def record(self, rows: torch.Tensor, draft_calls: int, tree: TokenTree, verdict: Verdict | None) -> None:
        self.target_calls[rows] += 1
        self.draft_calls[rows] += draft_calls
        self.verified[rows] += tree.drafted_count().cpu()
        if verdict is not None:
            self.accepted.append(verdict.accepted.cpu())

    def totals(self) -> tuple:
        return self.target_calls, self.draft_calls, self.accepted, self.verified


def _advance(
    t_beams: BeamState,
    d_beams: BeamState,
    verdict: Verdict,
    table: NodeTable,
    node_visible: torch.Tensor,
    g: int,
    trie: PrefixTrie,
) -> tuple[BeamState, BeamState]:
    """The new beams: parent node (depth + accepted) + token, except rows already complete; the draft's view of the
    same beams differs only in what they attend in its cache and in how much of them it has fed."""
    depth = t_beams.depth + verdict.accepted
    nodes = verdict.nodes[..., None]
    view = table.as_beams(node_visible, depth, t_beams.prompt_lengths)
    new = extend(view, verdict.nodes, verdict.tokens, verdict.scores, trie, grow=~verdict.complete)
    return new, dataclasses.replace(
        new,
        visible=table.draft_visible.gather(1, nodes.expand(-1, -1, table.draft_visible.shape[2])),
        # the draft never fed its last drafted level; with nothing drafted, it fed what it had fed
        fed=depth - (verdict.accepted == g).long() if g else d_beams.fed,
    )  # fmt: skip


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
) -> DecodeOutput:
    """Top-K identifiers of L tokens per left-padded prompt [B, P], N beams drafted gamma deep (``settings``).

    Each call verifies at most ``settings.budget`` drafted nodes (None: all; 0: plain beam steps, nothing drafted);
    with ``budget="auto"``, what the ``planner`` plans from the calls it has observed (``adaptive``). A ``header``
    that has learned the prompts' shared header puts its cached keys/values in both caches instead of recomputing it.
    """
    num_beams, levels, draft_beams, gamma = settings.num_beams, settings.levels, settings.draft_beams, settings.gamma
    budget = None if settings.budget == "auto" else settings.budget
    if sample and generator is None:
        raise ValueError("relaxed (sampling) decoding needs a generator")
    b, device = input_ids.shape[0], input_ids.device
    select = functools.partial(select_sample, generator=generator) if sample else select_top
    clock = StageClock(device)
    prompts = header.split(input_ids, attention_mask) if header is not None else Prompts(input_ids, attention_mask)
    caches = [prompts.cache(target, b), kv_cache.new_cache()]  # target, draft (the header only, if any)
    # neither model has seen the prompts: the target's first call takes them with the first tree (_first_forward);
    # the draft prefills when it first drafts (never, while a budget of 0 keeps to plain beam steps)
    t_beams = d_beams = root_state(prompts.visible, levels + gamma + 1, width=num_beams)
    out = DecodeOutputBuffer(
        torch.zeros(b, num_beams, levels, dtype=torch.long, device=device), torch.zeros(b, num_beams, device=device)
    )
    count = _Counters.zeros(b)
    rows = torch.arange(b, device=device)  # original index of each row still decoding
    first, prefilled = True, False
    while True:
        if not first:
            finished = t_beams.depth >= levels
            if bool(finished.any()):
                rows, (t_beams, d_beams) = _retire(finished, rows, (t_beams, d_beams), caches, out)
            if rows.numel() == 0:
                break
            t_beams = _compact(caches[0], t_beams)
            d_beams = _compact(caches[1], d_beams) if prefilled else d_beams
        m = planner.plan() if planner is not None else budget
        m = m if m is not None else gamma * draft_beams
        g = min(gamma, int((levels - t_beams.depth).max())) if m != 0 else 0
        clock.switch("draft")
        root_logits = None
        if g and not prefilled:  # d_beams still see the prompts only, none of their tokens fed
            rest = prompts.select(rows)
            caches[1] = rest.cache(draft, rows.numel())
            root_logits = prefill(draft, caches[1], rest.input_ids, rest.mask, rest.past)  # [B, V]: level 1
            count.draft_calls[rows.cpu()] += 1
            prefilled = True
        tree, table = draft_tree(
            draft, caches[1], d_beams, trie, draft_beams, g, select, keep_distributions=sample,
            root_logits=root_logits if first else None,
        )  # fmt: skip
        tree = within_budget(tree, m, by_score=not sample)
        clock.switch("verify")
        if first:
            logits, node_visible = _first_forward(target, caches[0], prompts, tree)
        else:
            logits, node_visible = _verify_forward(target, caches[0], t_beams, tree)
        if g:
            verdict = _decide(logits, tree, table, t_beams, levels, trie, verify_level, generator)
        else:  # nothing drafted: the target's own beam step (what every rule's bonus step is)
            verdict = _beam_step(logits[:, :num_beams], t_beams, trie, select)
        clock.switch("other")
        if planner is not None and g:  # a beam step always gains one token: nothing to learn
            planner.observe(m, verdict.accepted, _needed(tree, verdict, not sample), levels - t_beams.depth)
        count.record(rows.cpu(), g - int(first and g > 0), tree, verdict if g else None)  # first: the prefill gave 1
        first = False
        t_beams, d_beams = _advance(t_beams, d_beams, verdict, table, node_visible, g, trie)
    scores, order = out.scores.sort(dim=1, descending=True, stable=True)
    sequences = out.sequences.gather(1, order[..., None].expand_as(out.sequences))
    return DecodeOutput(sequences, scores, clock.stats(*count.totals()))
