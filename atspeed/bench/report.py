"""What the benchmark leaves behind: the machine header, a fixed-width table, the JSON and the speedup plot."""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
from pathlib import Path

import torch
import transformers

from atspeed.atomic import write_text_atomic
from atspeed.decoding.decoders import DECODERS
from atspeed.pipeline import cell
from atspeed.tables import text_table


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine(device: torch.device) -> dict:
    """Where the numbers were taken."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def check_timing_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The flags every benchmark script shares: --repeats, --warmup, --dtype, --device (``auto`` resolved here)."""
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        p.error(f"--dtype: unknown torch dtype {args.dtype!r}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")


# (header, row key, format)
COLUMNS = (
    ("decoder", "decoder", "s"),
    ("K", "K", "d"),
    ("b", "batch_size", "d"),
    ("N", "N", "d"),
    ("gam", "gamma", "d"),
    ("M", "budget_text", "s"),  # budget: drafted nodes verified per call ("-": all; "self": the target drafts)
    ("ver", "verified_nodes_per_call", ".1f"),
    ("ms/list", "ms_per_list", ".2f"),
    ("pred", "predicted_ms_per_list", ".2f"),  # from the cost model (batch 1)
    ("lists/s", "lists_per_second", ".1f"),
    ("xHF", "speedup_vs_hf", ".2f"),
    ("xbeam", "speedup_vs_beam", ".2f"),
    ("calls", "target_calls_per_list", ".2f"),
    ("drafts", "draft_calls_per_list", ".2f"),
    ("acc", "mean_accepted_depth", ".2f"),
    ("draft%", "draft_pct", ".0f"),
    ("sync", "syncs_per_call", ".2f"),  # host syncs per target call (one counted pass, untimed)
    ("ops", "ops_per_call", ".0f"),  # eager aten ops per target call outside the models
    ("=HF", "equals_hf", "s"),
)


def _budget_text(row: dict) -> str | None:
    if row.get("N") is None:
        return None
    if row.get("draft") == "target":
        return "self"
    return "-" if row.get("budget") is None else str(row["budget"])


def table(rows: list[dict]) -> str:
    """The rows as fixed-width text, one line per configuration."""

    def fields(row: dict) -> dict:
        draft = row.get("draft_fraction")
        return {
            **row,
            "ms_per_list": row.get("ms_per_list", 1e3 * row["seconds_per_list"]),
            "draft_pct": None if draft is None else 100 * draft,
            "predicted_ms_per_list": row.get("predicted_ms_per_list"),
            "budget_text": _budget_text(row),
        }

    body = ([cell(row[key], fmt) for _, key, fmt in COLUMNS] for row in map(fields, rows))
    return text_table([h for h, _, _ in COLUMNS], body)


def write_json(path: str | Path, report: dict) -> None:
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")


def best_speedups(rows: list[dict]) -> dict[tuple[str, int], list[tuple[int, float, dict]]]:
    """Per (decoder, batch size): (K, speedup vs HF, row) by K; for speculative decoders the best (N, gamma) per K."""
    best: dict[tuple[str, int], dict[int, dict]] = {}
    for row in rows:
        if row["speedup_vs_hf"] is None or row["decoder"] == "hf_beam":
            continue
        per_k = best.setdefault((row["decoder"], row["batch_size"]), {})
        if row["K"] not in per_k or row["speedup_vs_hf"] > per_k[row["K"]]["speedup_vs_hf"]:
            per_k[row["K"]] = row
    return {key: [(k, r["speedup_vs_hf"], r) for k, r in sorted(per_k.items())] for key, per_k in best.items()}


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_speedups(path: str | Path, rows: list[dict], title: str) -> bool:
    """PNG of speedup vs HF generate against K, one line per (decoder, batch size); False without matplotlib."""
    if not matplotlib_available():
        return False
    from matplotlib.figure import Figure  # a bare Figure renders through Agg: no pyplot, no global backend

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    colors = {
        "beam": "tab:gray",
        "spec_strict": "tab:blue",
        "spec_relaxed": "tab:orange",
        "beam_sample": "tab:green",
        "spec_relaxed_exact": "tab:red",
        "beam_sample_keyed": "tab:olive",
        "spec_keyed": "tab:purple",
    }
    styles = ["-", "--", ":", "-."]
    sizes = sorted({r["batch_size"] for r in rows})
    ks = sorted({r["K"] for r in rows})
    for (decoder, b), points in sorted(best_speedups(rows).items()):
        x, y = [p[0] for p in points], [p[1] for p in points]
        best = " (best N, gamma)" if DECODERS[decoder].needs_draft else ""
        ax.plot(x, y, styles[sizes.index(b) % len(styles)], marker="o", color=colors.get(decoder),
                label=f"{decoder}, batch {b}{best}")  # fmt: skip
    ax.axhline(1.0, color="black", linewidth=0.8, label="HF generate")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("K (list length = beams)")
    ax.set_ylabel("speedup vs HF generate (x)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    _write_bytes_atomic(Path(path), buffer.getvalue())
    return True


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
