"""The alignment study's plot: target calls per list against K, with standard-error bars (the aggregate of
``atspeed.bench.study_tables``)."""

from __future__ import annotations

import io
from pathlib import Path

from atspeed.atomic import atomic_file
from atspeed.bench.report import matplotlib_available
from atspeed.bench.study_tables import draft_groups


def plot_calls(path: str | Path, agg: list[dict], decoders: tuple[str, ...], n: int, gamma: int, title: str) -> bool:
    """PNG: target calls per list against K with standard-error bars, one panel per decoder, one line per draft
    group, beam search dashed; False without matplotlib."""
    if not matplotlib_available():
        return False
    from matplotlib.figure import Figure  # a bare Figure renders through Agg: no pyplot, no global backend

    fig = Figure(figsize=(4.5 * len(decoders) + 1, 4.5), layout="constrained")
    axes = fig.subplots(1, len(decoders), sharey=True, squeeze=False)[0]
    beam = sorted((e["K"], e["calls"]) for e in agg if e["decoder"] == "beam")
    for ax, decoder in zip(axes, decoders, strict=True):
        for group in draft_groups(agg):
            points = sorted(
                (e["K"], e["calls"], e["calls_se"] or 0.0)
                for e in agg
                if e["group"] == group and e["decoder"] == decoder and (e["N"], e["gamma"]) == (n, gamma)
            )
            if points:
                ax.errorbar(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    yerr=[p[2] for p in points],
                    marker="o",
                    markersize=3,
                    capsize=2,
                    label=group,
                )
        ax.plot([p[0] for p in beam], [p[1] for p in beam], "--", color="black", label="beam search")
        ks = sorted({p[0] for p in beam})
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("K (list length = beams)")
        ax.set_title(f"{decoder}, N = {n}, γ = {gamma}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("target calls per list (mean ± SE over seeds)")
    axes[-1].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    with atomic_file(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return True
