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

from collections import deque
from dataclasses import dataclass, field

import torch

from atspeed.decoding.costs import ms_at
from atspeed.decoding.draft_tree import TokenTree, budget_rank


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
    window: int = 256  # (row, call) observations kept
    explore: int = 8  # calls between two that verify the whole tree (doubling while beam steps win, up to max_explore)
    max_explore: int = 128
    warm: int = 2  # the first calls verify the whole tree
    grid: list[int] = field(init=False)
    _tokens: deque = field(init=False)
    _calls: int = field(init=False, default=0)
    _interval: int = field(init=False, default=0)
    _next_explore: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.grid = self.budgets(self.num_beams, self.draft_beams, self.gamma)
        self._tokens = deque(maxlen=self.window)
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

    def plan(self) -> int:
        """Budget of the next call: the grid's best predicted tokens per ms over the observations kept, or the whole
        tree for the first ``warm`` calls and the exploring ones (their interval doubles while beam steps win)."""
        self._calls += 1
        if self._calls <= self.warm or not self._tokens:
            return self.grid[-1]
        tokens = torch.stack(list(self._tokens)).float().mean(0)  # [grid]
        speed = tokens / torch.tensor([self.cost(m) for m in self.grid])
        best = self.grid[int(speed.argmax())]
        if self._calls >= self._next_explore:
            self._interval = self.explore if best else min(2 * self._interval, self.max_explore)
            self._next_explore = self._calls + self._interval
            return self.grid[-1]
        return best

    def observe(self, budget: int, accepted: torch.Tensor, needed: torch.Tensor, remaining: torch.Tensor) -> None:
        """One call: per row its ``accepted`` depth [B], ``needed`` budgets [B, G] and levels ``remaining`` [B]."""
        grid = torch.tensor(self.grid, device=needed.device)
        depths = torch.arange(1, needed.shape[1] + 1, device=needed.device)
        fits = (needed[:, None, :] <= grid[None, :, None]) & (depths[None, None, :] <= accepted[:, None, None])
        depth = torch.where(grid[None, :] <= budget, fits.sum(2), accepted[:, None])  # [B, grid]; unobserved: as used
        gained = torch.minimum(depth + 1, remaining[:, None])
        self._tokens.extend(gained.cpu().unbind(0))
