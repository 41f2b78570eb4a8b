"""Prefix trie over identifier token ids: the decoding constraint, vectorised over beams.

Decoding state is one int64 per beam: a trie node (0 = root, -1 = dead). Nodes are stored as tensors:

- ``child_ptr [S+1]``, ``child_token [E]``, ``child_state [E]``: the children of node s are edges
  ``child_ptr[s]:child_ptr[s+1]`` (CSR), sorted by token;
- ``keys [E] = parent * V + token`` in the same (sorted) order, so a transition is one
  ``torch.searchsorted`` for a whole batch of beams.

Two rules: ``"exact"`` allows at depth t only tokens that extend a valid identifier prefix;
``"per_position"`` (the paper's released code) allows at depth t every token seen at level t of
any identifier, so its graph has one node per depth. ``lookup`` always uses the exact trie.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from atspeed.items.trie_graph import Graph, Rule, check_identifiers, exact_graph, per_position_graph, step

DENSE_MASK_LIMIT = 1 << 25  # (states + 1) x (identifier span + 2) int32 entries (128 MiB) up to which masks and
# transitions come from a precomputed table


@dataclass(frozen=True)
class PrefixTrie:
    """Constraint for decoding item identifiers, over token ids; build with :meth:`PrefixTrie.build`."""

    vocab_size: int
    levels: int
    rule: Rule
    eos_token_id: int | None
    graph: Graph
    """The constraint graph (the exact trie, or the per-position layers)."""
    exact: Graph
    """The exact trie (the same object as ``graph`` under the exact rule), used by :meth:`lookup`."""

    @classmethod
    def build(
        cls, identifiers: torch.Tensor, vocab_size: int, rule: Rule = "exact", eos_token_id: int | None = None
    ) -> PrefixTrie:
        """Build from ``identifiers`` [I, L] (token ids, distinct rows; row i is item index i).

        ``vocab_size`` V is the width of the masks (the model's vocabulary). With ``eos_token_id``, a complete
        identifier allows exactly EOS next; without it, nothing.
        """
        check_identifiers(identifiers, vocab_size, eos_token_id, rule)
        identifiers = identifiers.detach().to("cpu", torch.long)
        exact = exact_graph(identifiers, vocab_size)
        graph = exact if rule == "exact" else per_position_graph(identifiers, vocab_size)
        return cls(vocab_size, identifiers.shape[1], rule, eos_token_id, graph, exact)

    @property
    def device(self) -> torch.device:
        return self.graph.keys.device

    @property
    def num_states(self) -> int:
        return self.graph.depth.numel()

    def to(self, device: str | torch.device) -> PrefixTrie:
        """A copy with every tensor on ``device``."""

        def move(graph: Graph) -> Graph:
            return Graph(*(getattr(graph, f.name).to(device) for f in dataclasses.fields(graph)))

        graph = move(self.graph)
        exact = graph if self.exact is self.graph else move(self.exact)
        return dataclasses.replace(self, graph=graph, exact=exact)

    def start(self, n: int) -> torch.Tensor:
        """Root states [n] for ``n`` beams."""
        return torch.zeros(n, dtype=torch.long, device=self.device)

    def on(self, device: str | torch.device) -> PrefixTrie:
        """This trie on ``device``: itself, or a copy made on first use and kept (one per device)."""
        device = torch.device(device)
        if device == self.device or (device.index is None and device.type == self.device.type):
            return self
        key = str(device)
        if key not in self._copies:
            self._copies[key] = self.to(device)
        return self._copies[key]

    @functools.cached_property
    def _copies(self) -> dict[str, PrefixTrie]:
        return {}

    def advance(self, states: torch.Tensor, tokens: torch.Tensor, in_vocab: bool = False) -> torch.Tensor:
        """Next states [M] after appending ``tokens`` [M] to ``states`` [M]; -1 if not allowed (dead stays dead).

        EOS after a complete identifier (when ``eos_token_id`` is set) keeps the state, so finished beams can
        be advanced with EOS padding. Runs on the states' device (the trie follows them: ``on``). ``in_vocab``: the
        caller vouches that every token is in [0, V) (a decoder's own choices), which saves an op per step.
        """
        trie = self.on(states.device)
        if trie._table is not None:
            return trie._dense_advance(trie._table, states, tokens if in_vocab else tokens.clamp(-1, self.vocab_size))
        g = trie.graph
        nxt = step(g.keys, g.child_state, states, tokens, self.vocab_size)
        if self.eos_token_id is not None:
            at_leaf = (states >= 0) & (g.depth[states.clamp(min=0)] == self.levels) & (tokens == self.eos_token_id)
            nxt = torch.where(at_leaf, states, nxt)
        return nxt

    @functools.cached_property
    def span(self) -> tuple[int, int]:
        """``[lo, hi)``: the token ids the graph's edges use (identifier tokens sit together in a vocabulary)."""
        tokens = self.graph.child_token
        return (int(tokens.min()), int(tokens.max()) + 1) if tokens.numel() else (0, 0)

    @functools.cached_property
    def num_items(self) -> int:
        """The number of items: leaves of the exact trie (one host sync, once per trie object)."""
        return int((self.on("cpu").exact.depth == self.levels).sum())

    @functools.cached_property
    def _table(self) -> torch.Tensor | None:
        """Every state's next state by every identifier-span token, plus an EOS and a "none" column: int32
        [S + 1, hi - lo + 2] (-1: not allowed), when that fits in ``DENSE_MASK_LIMIT`` entries; row S, where a dead
        state (-1) lands as a negative index, is all -1. Masks and transitions are then one gather each (a
        LLaMA-sized vocabulary costs only its identifier columns)."""
        lo, hi = self.span
        s, width = self.num_states, hi - lo + 2
        if (s + 1) * width > DENSE_MASK_LIMIT:
            return None
        g = self.graph
        table = torch.full((s + 1, width), -1, dtype=torch.int32, device=self.device)
        parents = torch.repeat_interleave(torch.arange(s, device=self.device), g.child_ptr.diff())
        table[parents, g.child_token - lo] = g.child_state.int()
        if self.eos_token_id is not None:  # EOS after a complete identifier keeps the state
            leaves = (g.depth == self.levels).nonzero().flatten()
            table[leaves, self._eos_column] = leaves.int()
        return table

    @property
    def _eos_column(self) -> int:
        lo, hi = self.span
        return self.eos_token_id - lo if lo <= self.eos_token_id < hi else hi - lo

    @functools.cached_property
    def _columns(self) -> torch.Tensor:
        """[V + 2] the ``_table`` column of each token id t in [0, V) at index t; index V and index V + 1 (= -1, as a
        negative index) give the "none" column, where tokens clamped to [-1, V] outside the vocabulary land."""
        lo, hi = self.span
        columns = torch.full((self.vocab_size + 2,), hi - lo + 1, dtype=torch.long, device=self.device)
        columns[lo:hi] = torch.arange(hi - lo, device=self.device)
        if self.eos_token_id is not None:
            columns[self.eos_token_id] = self._eos_column
        return columns

    def _dense_advance(self, table: torch.Tensor, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` in [-1, V] (index -1 is the last entry of ``_columns``: "none")."""
        return table[states, self._columns[tokens]].long()  # a dead state (-1) indexes the last row, all -1

    def mask(self, states: torch.Tensor) -> torch.Tensor:
        """Allowed next tokens [..., V] (bool) for ``states`` [...]; a dead state allows nothing. On the states' device;
        with the dense table (``_table``) no value is read back to the host."""
        return self._dense_mask(states, allowed=True)

    def forbidden(self, states: torch.Tensor) -> torch.Tensor:
        """``~mask(states)``, made directly (one op less per beam step)."""
        return self._dense_mask(states, allowed=False)

    def _dense_mask(self, states: torch.Tensor, allowed: bool) -> torch.Tensor:
        trie = self.on(states.device)
        table = trie._table
        if table is None:
            mask = trie._sparse_mask(states.reshape(-1)).view(*states.shape, self.vocab_size)
            return mask if allowed else ~mask
        allowed_table, forbidden_table, columns = trie._mask_tables
        rows = (allowed_table if allowed else forbidden_table)[states]  # [..., hi - lo + 2]; -1: the last row
        return rows.index_select(-1, columns)  # [..., V]: two ops, whatever the vocabulary

    @functools.cached_property
    def _mask_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_table >= 0`` (bool [S + 1, hi - lo + 2]: allowed), its negation, and the table column of every token
        id [V] (the "none" column, never allowed, outside the span but for EOS)."""
        with torch.inference_mode(False):  # usable outside inference mode too (a validation step inside fit)
            allowed = self._table >= 0
            return allowed, ~allowed, self._columns[: self.vocab_size].clone()

    def _sparse_mask(self, states: torch.Tensor) -> torch.Tensor:
        g = self.graph
        alive = states >= 0
        safe = states.clamp(min=0)
        first = g.child_ptr[safe]  # [M]
        counts = torch.where(alive, g.child_ptr[safe + 1] - first, torch.zeros_like(first))  # [M]
        rows = torch.repeat_interleave(torch.arange(states.numel(), device=states.device), counts)  # [N]
        row_start = torch.repeat_interleave(counts.cumsum(0) - counts, counts)  # [N] first slot of each row
        edges = torch.repeat_interleave(first, counts) + torch.arange(rows.numel(), device=states.device) - row_start
        allowed = torch.zeros(states.numel(), self.vocab_size, dtype=torch.bool, device=states.device)
        allowed[rows, g.child_token[edges]] = True
        if self.eos_token_id is not None:
            allowed[:, self.eos_token_id] = alive & (g.depth[safe] == self.levels)
        return allowed

    def states_for(self, prefixes: torch.Tensor) -> torch.Tensor:
        """States [M] reached from the root by ``prefixes`` [M, t] (t may be 0)."""
        states = self.start(prefixes.shape[0])
        for t in range(prefixes.shape[1]):
            states = self.advance(states, prefixes[:, t])
        return states

    def allowed_tokens(self, prefix: Sequence[int]) -> list[int]:
        """Allowed next token ids after the identifier tokens ``prefix``, for ``prefix_allowed_tokens_fn``.

        ``prefix`` holds only the identifier tokens generated so far (strip the prompt first).
        """
        prefix_tensor = torch.as_tensor(list(prefix), dtype=torch.long, device=self.device).reshape(1, -1)
        state = int(self.states_for(prefix_tensor)[0])
        if state < 0:
            return []
        g = self.graph
        allowed = g.child_token[int(g.child_ptr[state]) : int(g.child_ptr[state + 1])].tolist()
        if self.eos_token_id is not None and int(g.depth[state]) == self.levels:
            allowed.append(self.eos_token_id)
        return allowed

    def lookup(self, identifiers: torch.Tensor) -> torch.Tensor:
        """Item index [...] of each identifier in ``identifiers`` [..., L] (token ids, e.g. decoded lists
        [B, K, L]), or -1 where it is no item's identifier; on the trie's device."""
        if identifiers.dim() < 2 or identifiers.shape[-1] != self.levels:
            raise ValueError(f"identifiers must be [..., {self.levels}], got shape {tuple(identifiers.shape)}")
        flat = identifiers.reshape(-1, self.levels).to(self.device)  # [M, L]
        g = self.exact
        states = torch.zeros(flat.shape[0], dtype=torch.long, device=self.device)
        for t in range(self.levels):
            states = step(g.keys, g.child_state, states, flat[:, t], self.vocab_size)
        return torch.where(states >= 0, g.item[states.clamp(min=0)], states).view(identifiers.shape[:-1])
