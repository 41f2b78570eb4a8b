"""The grid of decoding configurations, and timing each one on the same requests.

For every batch size b and list length K the references run first: ``hf_beam`` (Hugging Face ``generate``) and
``beam`` (our beam search); then ``spec_strict`` / ``spec_relaxed`` for every (N, gamma) with N >= K. A configuration
is timed as ``warmup`` decodes of its first batch, then ``repeats`` timed passes over all of its batches (interleaved
with the other configurations of the same K and b); the row reports the median pass divided by the number of lists.
Counters, equality with HF and Recall/NDCG come from the first timed pass. After the timed passes, one more
(untimed) pass over the batches runs under ``HostSyncCounter``: ``syncs_per_call`` (host syncs per target forward)
and ``ops_per_call`` (eager aten ops per target forward outside the models); the counter slows every op down, so it
never runs inside a timed pass. The decoders time their stages with ``synced_clock=True`` (the device is waited for
at each stage switch, so the draft / verify / other split is the device's time, not the launches').
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils import benchmark

from atspeed.bench.host_syncs import HostSyncCounter
from atspeed.bench.workload import Workload
from atspeed.decoding.decoders import DECODERS, BoundDecoder, DecoderName
from atspeed.decoding.options import BudgetOption, DecodeOptions
from atspeed.decoding.output import DecodeOutput, DecodeStats, synced_now
from atspeed.decoding.result import DecodeResult
from atspeed.metrics.ranking import RankingMetrics

REFERENCES: tuple[DecoderName, ...] = ("hf_beam", "beam")
SCORE_TOLERANCE = 1e-3  # |score - HF score| allowed for a list to count as equal to HF generate's


@dataclass(frozen=True)
class BenchConfig:
    decoder: DecoderName
    k: int
    batch_size: int
    draft_beams: int | None = None  # N (speculative decoders only)
    gamma: int | None = None  # draft steps per target call (speculative decoders only)
    budget: BudgetOption = None  # M: drafted nodes verified per call (speculative decoders only)
    self_draft: bool = False  # the target drafts for itself (a perfect draft)

    def options(self, seed: int) -> DecodeOptions:
        """The decode of this configuration, as the predict stage would be told it."""
        n, gamma = self.draft_beams or self.k, self.gamma or 1
        return DecodeOptions(self.decoder, self.k, n, gamma, self.budget, seed)


def check_grid(
    ks: Sequence[int],
    batch_sizes: Sequence[int],
    draft_beams: Sequence[int],
    gammas: Sequence[int],
    requests: Sequence[int],
    speculative: bool = True,
) -> None:
    """Raise ValueError naming the flag when the grid is empty or out of range; ``requests[i]`` goes with batch i."""
    for flag, values in (("--ks", ks), ("--batch-sizes", batch_sizes), ("--requests", requests)):
        if not values or min(values) < 1:
            raise ValueError(f"{flag}: values must be >= 1, got {list(values)}")
    for b, r in zip(batch_sizes, requests, strict=True):
        if r % b:
            raise ValueError(f"--requests: {r} requests for batch size {b} is not a whole number of batches")
    if not speculative:
        return
    if not gammas or min(gammas) < 1:
        raise ValueError(f"--gammas: gamma must be >= 1, got {list(gammas)}")
    if not draft_beams or min(draft_beams) < 1:
        raise ValueError(f"--draft-beams: N must be >= 1, got {list(draft_beams)}")
    for k in ks:
        if max(draft_beams) < k:
            raise ValueError(f"--draft-beams: no N >= K = {k} in {list(draft_beams)} (the draft keeps N >= K beams)")


def build_grid(
    decoders: Sequence[DecoderName],
    ks: Sequence[int],
    batch_sizes: Sequence[int],
    draft_beams: Sequence[int],
    gammas: Sequence[int],
    budgets: Sequence[BudgetOption] = (None,),
    self_draft_gamma: int | None = None,
) -> list[BenchConfig]:
    """Configurations in run order: per batch size and K, the references first, then (N >= K) x gamma x budget;
    with ``self_draft_gamma``, spec_strict with the target as its own draft (N = K) closes each group."""
    order = [d for d in REFERENCES if d in decoders] + [d for d in decoders if d not in REFERENCES]
    grid = []
    for b in batch_sizes:
        for k in ks:
            for name in order:
                if not DECODERS[name].needs_draft:
                    grid.append(BenchConfig(name, k, b))
                    continue
                for n in sorted({n for n in draft_beams if n >= k}):
                    grid += [BenchConfig(name, k, b, n, g, m) for g in sorted(set(gammas)) for m in budgets]
            if self_draft_gamma is not None:
                grid.append(BenchConfig("spec_strict", k, b, k, self_draft_gamma, None, self_draft=True))
    return grid


class Runner:
    """Decodes ``batches`` with one configuration: untimed warm-up decodes, and timed passes over all batches."""

    def __init__(
        self, config: BenchConfig, work: Workload, batches: list[tuple[torch.Tensor, torch.Tensor]], seed: int
    ):
        self.config, self.work, self.batches = config, work, batches
        settings = config.options(seed).settings(work.levels, work.pad_token_id)
        draft = work.target if config.self_draft else work.draft
        self.decoder = BoundDecoder(config.decoder, work.target, work.trie, settings, draft, synced_clock=True)
        self.seed = seed

    def _decode(self, ids: torch.Tensor, mask: torch.Tensor) -> DecodeOutput:
        # sampling decoders get a fresh generator seeded alike each call: every pass does the same work (the budget
        # planner of budget="auto" keeps learning across calls, warm-up included)
        generator = torch.Generator(device=ids.device).manual_seed(self.seed)
        return self.decoder(ids, mask, generator)

    def warm_up(self, times: int) -> None:
        for _ in range(times):
            self._decode(*self.batches[0])

    def timed_pass(self) -> tuple[float, list[DecodeOutput]]:
        device = self.batches[0][0].device
        start = synced_now(device)
        outputs = [self._decode(ids, mask) for ids, mask in self.batches]
        return synced_now(device) - start, outputs

    def counted_pass(self) -> dict[str, float | None]:
        """``syncs_per_call`` / ``ops_per_call``: one untimed pass over all batches under ``HostSyncCounter``."""
        models = [self.work.target, self.work.draft]
        with HostSyncCounter(models, self.batches[0][0].device) as counter:
            for ids, mask in self.batches:
                self._decode(ids, mask)
        calls = counter.calls(self.work.target)
        if not calls:
            return {"syncs_per_call": None, "ops_per_call": None}
        return {"syncs_per_call": counter.syncs / calls, "ops_per_call": (counter.ops - counter.model_ops) / calls}


def median(seconds: list[float]) -> float:
    """Median of timed passes, through ``torch.utils.benchmark``'s ``Measurement`` (one run per pass)."""
    return benchmark.Measurement(1, seconds, benchmark.TaskSpec(stmt="decode pass", setup="")).median


def time_group(runners: list[Runner], repeats: int, warmup: int) -> list[tuple[list[float], list[DecodeOutput]]]:
    """Seconds of each timed pass and the first pass's outputs, per runner.

    Passes go round-robin over the group (pass 1 of every configuration, then pass 2, ...), so a burst of load from
    elsewhere on the machine lands on several configurations' passes instead of all of one configuration's.
    """
    for runner in runners:
        runner.warm_up(warmup)
    seconds: list[list[float]] = [[] for _ in runners]
    firsts: list[list[DecodeOutput]] = [[] for _ in runners]
    for _ in range(repeats):
        for i, runner in enumerate(runners):
            elapsed, outputs = runner.timed_pass()
            seconds[i].append(elapsed)
            firsts[i] = firsts[i] or outputs
    return list(zip(seconds, firsts, strict=True))


def count_group(runners: list[Runner]) -> list[dict[str, float | None]]:
    """Host syncs and eager ops per target call of each runner (one counted pass each, after the timing)."""
    return [runner.counted_pass() for runner in runners]


def _joined(outputs: list[DecodeOutput]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([o.sequences for o in outputs]).cpu(), torch.cat([o.scores for o in outputs]).float().cpu()


def hf_mismatches(outputs: list[DecodeOutput], hf: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Lists whose identifiers differ from HF generate's, or whose scores differ by more than the tolerance."""
    sequences, scores = _joined(outputs)
    same = (sequences == hf[0]).flatten(1).all(dim=1) & ((scores - hf[1]).abs() <= SCORE_TOLERANCE).all(dim=1)
    return int((~same).sum())


def ranking(outputs: list[DecodeOutput], work: Workload, k: int) -> dict[str, float]:
    """``recall_at_k`` and ``ndcg_at_k`` (K = the list length) of the decoded lists against the ground truth."""
    sequences, _ = _joined(outputs)
    items = work.trie.lookup(sequences).cpu()  # [B, K]
    metrics = RankingMetrics([k])
    metrics.update_lists(items, work.targets[: items.shape[0]], torch.arange(items.shape[0]))
    values = metrics.compute()
    return {"recall_at_k": float(values[f"recall@{k}"]), "ndcg_at_k": float(values[f"ndcg@{k}"])}


def _fractions(stats: DecodeStats) -> dict[str, float | None]:
    total = stats.seconds
    parts = {"draft": stats.draft_seconds, "verify": stats.verify_seconds, "other": stats.other_seconds}
    return {f"{name}_fraction": (value / total if total > 0 else None) for name, value in parts.items()}


def make_row(config: BenchConfig, seconds: list[float], outputs: list[DecodeOutput], work: Workload) -> dict:
    """One JSON row (speedups and HF equality are filled in by ``run_grid``)."""
    lists = sum(o.scores.shape[0] for o in outputs)
    result = DecodeResult(lists, median(seconds))  # the warm-up decodes are not among the timed passes
    per_list = result.seconds / lists
    stats = DecodeStats.merge(o.stats for o in outputs)
    summary = stats.summary(work.levels)
    spec = DECODERS[config.decoder].needs_draft
    return {
        "decoder": config.decoder,
        "K": config.k,
        "batch_size": config.batch_size,
        "N": config.draft_beams,
        "gamma": config.gamma,
        "budget": config.budget,
        "draft": ("target" if config.self_draft else "draft") if spec else None,
        "lists": lists,
        "seconds_per_list": per_list,
        "ms_per_list": result.ms_per_list,
        "seconds_per_list_repeats": [s / lists for s in seconds],
        "lists_per_second": 1.0 / per_list if per_list > 0 else None,
        "speedup_vs_hf": None,
        "speedup_vs_beam": None,
        "target_calls_per_list": summary["target_calls_per_list"],
        "draft_calls_per_list": summary["draft_calls_per_list"],
        "tokens_per_target_call": summary["tokens_per_target_call"],
        "mean_accepted_depth": summary["mean_accepted_depth"] if spec else None,
        "verified_nodes_per_call": summary["verified_nodes_per_call"] if spec else None,
        "accepted_histogram": stats.histogram(config.gamma) if spec else None,
        **_fractions(stats),
        "equals_hf": None,
        "hf_mismatched_lists": None,
        **ranking(outputs, work, config.k),
    }


def run_grid(
    grid: list[BenchConfig],
    work: Workload,
    requests: dict[int, int],
    device: torch.device,
    repeats: int,
    warmup: int,
    seed: int,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Time every configuration; ``requests[b]`` lists per configuration of batch size b (the same requests).

    Configurations of the same (K, b) form a group timed together (``time_group``), the references first.
    """
    batches = {b: work.batches(b, r, device) for b, r in requests.items()}
    groups: dict[tuple[int, int], list[BenchConfig]] = {}
    for config in grid:
        groups.setdefault((config.k, config.batch_size), []).append(config)
    rows = []
    with torch.inference_mode():
        for configs in groups.values():
            torch.manual_seed(seed)
            runners = [Runner(c, work, batches[c.batch_size], seed) for c in configs]
            hf = None
            timed = time_group(runners, repeats, warmup)
            for config, (seconds, outputs), counts in zip(configs, timed, count_group(runners), strict=True):
                row = make_row(config, seconds, outputs, work) | counts
                if config.decoder == "hf_beam":
                    hf = _joined(outputs)
                elif DECODERS[config.decoder].deterministic and hf is not None:
                    row["hf_mismatched_lists"] = hf_mismatches(outputs, hf)
                    row["equals_hf"] = row["hf_mismatched_lists"] == 0
                rows.append(row)
                if progress is not None:
                    progress(row)
    add_speedups(rows)
    return rows


def bench_result(row: dict) -> DecodeResult:
    """A row's ``DecodeResult``: its median timed pass over its lists."""
    return DecodeResult(row["lists"], row["seconds_per_list"] * row["lists"])


def add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_hf`` / ``speedup_vs_beam``: ``DecodeResult.speedup_over`` the reference of the same K and b."""
    refs = {(r["decoder"], r["K"], r["batch_size"]): bench_result(r) for r in rows if r["decoder"] in REFERENCES}
    for row in rows:
        for name, field in (("hf_beam", "speedup_vs_hf"), ("beam", "speedup_vs_beam")):
            ref = refs.get((name, row["K"], row["batch_size"]))
            if ref is not None:
                row[field] = bench_result(row).speedup_over(ref)
