"""``budget="auto"``: each verification call's tree size, chosen from the measured cost model and the acceptance seen.

A call that verifies the best M drafted nodes (``draft_tree.within_budget``) costs about
``c(M) = target(K + M) + gamma * draft(N)`` ms (``target(K)`` alone for M = 0: a plain beam step, nothing drafted) and
gains ``1 + a(M)`` tokens, a(M) the depth it accepts. After a call, a(M) is known for every M up to the budget it
used: a level is accepted when the target's choices at that level are verified nodes (strict: exactly; relaxed: the
same count, its choices being random), so the largest draft rank among the nodes chosen at levels 1..d is the
smallest budget that would still have accepted depth d (``needed_budgets``). The planner keeps the last ``window``
calls and takes the M of its grid with the most tokens per ms; larger budgets than the one used are unobserved
(counted as the one used), so some calls verify the whole tree: every ``explore``-th, the interval doubling (up to
``max_explore``) while beam steps stay the best plan. A draft that keeps missing thus turns decoding into plain beam
steps (and rarer and rarer exploring calls) instead of paying for trees it never uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from atspeed.decoding.planning.costs import ms_at
from atspeed.decoding.search.draft_tree import TokenTree, budget_rank


def needed_budgets(tree: TokenTree, chosen: list[torch.Tensor], by_score: bool) -> torch.Tensor:
    """[B, G]: for each accepted depth d (1..G), the smallest budget whose verified nodes (``budget_rank``) hold
    every node chosen at levels 1..d; ``chosen[g - 1]`` [B, K] are the node ids chosen at level g. Entries past a
    row's accepted depth are meaningless."""
    rank = budget_rank(tree, by_score)
    rank = torch.cat([rank.new_full((rank.shape[0], tree.roots), -1), rank], dim=1)  # roots cost nothing
    per_level = torch.stack([rank.gather(1, nodes).max(1).values + 1 for nodes in chosen], dim=1)  # [B, G]
    return per_level.cummax(1).values


@dataclass
class BudgetPlanner:
    """Chooses M for the next call; ``observe`` feeds it what each call accepted."""

    num_beams: int
    draft_beams: int
    gamma: int
    target_ms: dict[str, float]  # costs.forward_costs of the target
    draft_ms: dict[str, float]
    memory: float = 0.98  # per call, the weight kept of what earlier calls showed
    explore: int = 8  # calls between two that verify the whole tree (doubling while beam steps win, up to max_explore)
    max_explore: int = 128
    warm: int = 2  # the first calls verify the whole tree
    grid: list[int] = field(init=False)
    _costs: torch.Tensor = field(init=False, repr=False)
    _tokens: torch.Tensor = field(init=False, repr=False)  # [grid] decayed sums of tokens gained per call
    _weight: torch.Tensor = field(init=False, repr=False)  # [grid] decayed counts of (row, call) observations
    _calls: int = field(init=False, default=0)
    _interval: int = field(init=False, default=0)
    _next_explore: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.grid = self.budgets(self.num_beams, self.draft_beams, self.gamma)
        self._costs = torch.tensor([self.cost(m) for m in self.grid], dtype=torch.float64)
        self._tokens = torch.zeros(len(self.grid), dtype=torch.float64)
        self._weight = torch.zeros(len(self.grid), dtype=torch.float64)
        self._interval = self.explore
        self._next_explore = self.warm + self.explore

    @staticmethod
    def budgets(num_beams: int, draft_beams: int, gamma: int) -> list[int]:
        """The grid: 0 (a beam step), K, 2K, 4K, ... below the full tree, and the full tree gamma x N."""
        full = gamma * draft_beams
        return sorted({0, full} | {m for m in (num_beams * 2**i for i in range(16)) if m < full})

    def cost(self, budget: int) -> float:
        """Predicted ms of a call that verifies ``budget`` drafted nodes."""
        drafting = self.gamma * ms_at(self.draft_ms, self.draft_beams) if budget else 0.0
        return ms_at(self.target_ms, self.num_beams + budget) + drafting

    def speeds(self) -> torch.Tensor:
        """[grid] predicted tokens per ms of each budget (0 where nothing was observed yet)."""
        tokens = self._tokens / self._weight.clamp(min=1e-12)
        return torch.where(self._weight > 0, tokens / self._costs, 0.0)

    def plan(self) -> int:
        """Budget of the next call: the grid's best predicted tokens per ms, or the whole tree for the first ``warm``
        calls and the exploring ones (their interval doubles while beam steps win)."""
        self._calls += 1
        if self._calls <= self.warm or not bool((self._weight > 0).all()):
            return self.grid[-1]
        best = self.grid[int(self.speeds().argmax())]
        if self._calls >= self._next_explore:
            self._interval = self.explore if best else min(2 * self._interval, self.max_explore)
            self._next_explore = self._calls + self._interval
            return self.grid[-1]
        return best

    def beam_list(self, calls: int) -> bool:
        """Whether the next ``calls`` calls (a whole list) would all be beam steps; if so they count as taken, and
        the caller runs plain beam search (no speculation machinery at all)."""
        ready = self._calls >= self.warm and bool((self._weight > 0).all())
        if not ready or self._calls + calls >= self._next_explore or self.grid[int(self.speeds().argmax())] != 0:
            return False
        self._calls += calls
        return True

    def observe(self, budget: int, accepted: torch.Tensor, needed: torch.Tensor, remaining: torch.Tensor) -> None:
        """One call: per row its ``accepted`` depth [B], ``needed`` budgets [B, G] and levels ``remaining`` [B].
        Only budgets up to the one used are observed (what larger ones would have done is unknown)."""
        grid = torch.tensor(self.grid, device=needed.device)
        depths = torch.arange(1, needed.shape[1] + 1, device=needed.device)
        fits = (needed[:, None, :] <= grid[None, :, None]) & (depths[None, None, :] <= accepted[:, None, None])
        gained = torch.minimum(fits.sum(2) + 1, remaining[:, None])  # [B, grid]
        seen = torch.tensor([m <= budget for m in self.grid])
        total = gained.sum(0).double().cpu()
        self._tokens = torch.where(seen, self.memory * self._tokens + total, self._tokens)
        self._weight = torch.where(seen, self.memory * self._weight + gained.shape[0], self._weight)
