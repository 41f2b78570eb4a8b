"""A *predicted* GPU speedup over beam search from a roofline per forward (no GPU needed; nothing here is measured).

One forward of T tokens (batch 1) after ``context`` cached tokens takes

    ms(T) = 1e3 * max((weight bytes + KV bytes read) / bandwidth, 2 * params * T / FLOP/s) + overhead_ms

(weights in bf16: 2 bytes a parameter; KV read: 2 (K and V) x layers x hidden x 2 bytes per cached token; the
overhead is a fixed per-forward cost: launches, Python). A list then costs, with ``host_ms`` added to every target
call (the decoder's own host work between forwards):

- beam search: the prefill of P prompt tokens, then L - 1 forwards of K tokens: L target calls;
- speculative: the target's first call reads the prompt and the first tree (P + tree tokens), each further call a
  tree of K + verified drafted nodes (K + gamma x N when not given); the draft's prefill of P tokens, then
  (draft calls - 1) forwards of N tokens.

``ratio = beam ms / speculative ms`` at each K, with the call counts measured by the decoding benchmark (a JSON row)
or given (the quick start's 1.60 target calls per list at K = 10, N = 40, gamma = 3 with the aligned draft).
``per_host_ms`` is what one more ms of host work per target call does to that ratio (ratio at host_ms + 1 minus it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from atspeed.tables import markdown_table


@dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth: float  # HBM bytes per second
    flops: float  # dense bf16 FLOP per second


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: float
    layers: int
    hidden: int  # K/V width per layer (no grouped-query attention in these shapes)
    bytes_per_param: int = 2  # bf16

    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.hidden * self.bytes_per_param


HARDWARE = (Hardware("A100 80GB", 2.0e12, 312e12), Hardware("H100 SXM", 3.35e12, 989e12))
TARGET_7B = ModelShape("7B target", 6.7e9, 32, 4096)
DRAFT_68M = ModelShape("68M draft", 68e6, 2, 768)


def forward_ms(hw: Hardware, model: ModelShape, tokens: int, context: int = 0, overhead_ms: float = 0.0) -> float:
    """Predicted ms of one batch-1 forward of ``tokens`` new tokens after ``context`` cached ones."""
    moved = model.params * model.bytes_per_param + model.kv_bytes_per_token() * context
    computed = 2 * model.params * tokens
    return 1e3 * max(moved / hw.bandwidth, computed / hw.flops) + overhead_ms


@dataclass(frozen=True)
class Calls:
    """What one list costs in calls, at one K (measured by the benchmark, or given)."""

    k: int
    target_calls: float
    draft_calls: float
    n: int  # draft beams
    gamma: int
    verified: float | None = None  # drafted nodes verified per call (None: the whole tree, gamma x N)

    @property
    def tree(self) -> float:
        return self.k + (self.gamma * self.n if self.verified is None else self.verified)


def beam_ms(hw: Hardware, target: ModelShape, k: int, levels: int, prompt: int, overhead: float, host: float) -> float:
    steps = sum(forward_ms(hw, target, k, prompt + d, overhead) for d in range(1, levels))
    return forward_ms(hw, target, prompt, 0, overhead) + steps + levels * host


def spec_ms(hw: Hardware, target: ModelShape, draft: ModelShape, calls: Calls, prompt: int, overhead: float,
            host: float) -> float:  # fmt: skip
    tree = round(calls.tree)
    first = forward_ms(hw, target, prompt + tree, 0, overhead)
    rest = (calls.target_calls - 1) * forward_ms(hw, target, tree, prompt, overhead)
    drafts = forward_ms(hw, draft, prompt, 0, overhead) + (calls.draft_calls - 1) * forward_ms(
        hw, draft, calls.n, prompt, overhead
    )
    return first + rest + drafts + calls.target_calls * host


def predict(calls: Sequence[Calls], levels: int = 4, prompt: int = 150, overhead_ms: float = 0.0,
            host_ms: float = 0.0, hardware: Sequence[Hardware] = HARDWARE, target: ModelShape = TARGET_7B,
            draft: ModelShape = DRAFT_68M) -> list[dict]:  # fmt: skip
    """One predicted row per (hardware, K): beam and speculative ms per list, their ratio and its host-ms cost."""
    rows = []
    for hw in hardware:
        for c in calls:
            beam = beam_ms(hw, target, c.k, levels, prompt, overhead_ms, host_ms)
            spec = spec_ms(hw, target, draft, c, prompt, overhead_ms, host_ms)
            beam1 = beam_ms(hw, target, c.k, levels, prompt, overhead_ms, host_ms + 1)
            spec1 = spec_ms(hw, target, draft, c, prompt, overhead_ms, host_ms + 1)
            rows.append({"hardware": hw.name, **asdict(c), "tree": c.tree, "beam_ms": beam, "spec_ms": spec,
                         "ratio": beam / spec, "ratio_plus_1ms_host": beam1 / spec1,
                         "per_host_ms": beam1 / spec1 - beam / spec})  # fmt: skip
    return rows


def given_calls(ks: Sequence[int], target_calls: float, n: int, gamma: int, draft_calls: float | None = None,
                levels: int = 4) -> list[Calls]:  # fmt: skip
    """The same call counts at every K (draft calls default: min(gamma, L) per target call)."""
    drafts = target_calls * min(gamma, levels) if draft_calls is None else draft_calls
    return [Calls(k, target_calls, drafts, n, gamma) for k in ks]


def calls_from_report(report: dict, ks: Sequence[int], n: int, gamma: int) -> list[Calls]:
    """Batch-1 spec_strict rows (the draft, not the target, drafting; whole tree or fixed budget) of a benchmark
    report with this N and gamma, at the K in ``ks`` it has."""
    out = []
    for row in report["rows"]:
        fits = (row["decoder"] == "spec_strict" and row["batch_size"] == 1 and row["N"] == n and row["gamma"] == gamma
                and row.get("draft") == "draft" and row.get("budget") != "auto" and row["K"] in ks)  # fmt: skip
        if fits:
            out.append(Calls(row["K"], row["target_calls_per_list"], row["draft_calls_per_list"], n, gamma,
                             row.get("verified_nodes_per_call")))  # fmt: skip
    return sorted(out, key=lambda c: c.k)


def table(rows: Sequence[dict]) -> str:
    """Markdown, every number labelled predicted."""
    columns = ["hardware", "K", "target calls", "draft calls", "tree", "beam ms (pred.)", "spec ms (pred.)",
               "x beam (pred.)", "x beam, +1 ms host/call", "change per host ms"]  # fmt: skip
    cells = ([r["hardware"], r["k"], f"{r['target_calls']:.2f}", f"{r['draft_calls']:.2f}", f"{r['tree']:.0f}",
              f"{r['beam_ms']:.2f}", f"{r['spec_ms']:.2f}", f"{r['ratio']:.2f}x",
              f"{r['ratio_plus_1ms_host']:.2f}x", f"{r['per_host_ms']:+.3f}"] for r in rows)  # fmt: skip
    return markdown_table(columns, cells)
