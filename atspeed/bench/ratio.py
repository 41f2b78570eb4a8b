"""A realistic size ratio, predicted: a target 43x its draft, too large to train here, costed on this machine and
combined with the acceptance that the decoding benchmark measured on trained models.

For each batch-1 row of a benchmark report, the prediction is

    forwards at the ratio models' measured costs (``cost_model.predicted_ms_per_list`` with the row's own call counts
    and verified nodes) + the host-side time of the row (its measured ms per list minus the same prediction at the
    trained models' costs: work between forwards, which does not grow with the models).

Rows whose calls depend on the trained models' costs (``budget="auto"``, planned from them) are left out, and so is
HF generate (no cost model). Everything this module writes is labelled predicted.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from atspeed.bench.cost_model import forward_costs, predicted_ms_per_list, tree_sizes
from atspeed.models.families import Family, family_config, family_of, random_model
from atspeed.tables import markdown_table

# random models of the cost model (of the trained target's family): a 34.5 M-parameter target (as a Llama),
# and the Beauty target's shape as the draft
SHAPES = {
    "target": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "intermediate_size": 2048},
    "draft": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 512},
}


def random_ratio_model(family: Family, vocab: int, shape: dict, context: int, seed: int) -> torch.nn.Module:
    return random_model(family_config(family, vocab_size=vocab, max_position_embeddings=context, **shape), seed)


def target_config(report: dict) -> dict:
    """The exported target's config.json the report names ({} when the report's models are not on disk)."""
    path = Path(report["models"].get("target", "")) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def vocab_size(report: dict) -> int:
    """The trained target's vocabulary: in the report, or in the exported target's config.json it names."""
    models = report["models"]
    if "vocab_size" in models:
        return int(models["vocab_size"])
    return int(target_config(report)["vocab_size"])


def ratio_family(report: dict) -> Family:
    """The family of the trained target (its config.json), Llama when it is not on disk or not in the table."""
    return family_of(target_config(report)) or "llama"


def ratio_costs(report: dict, repeats: int, seed: int = 0) -> dict:
    """Parameters and forward costs of the two ratio models, on a prompt as long as the report's cost model used."""
    rows = [r for r in report["rows"] if r["batch_size"] == 1 and r["N"] is not None]
    ks = sorted({r["K"] for r in rows})
    sizes = tree_sizes(ks, sorted({r["N"] for r in rows}), sorted({r["gamma"] for r in rows}))
    vocab = vocab_size(report)
    length = int(report["cost_model"]["prompt_tokens"])
    prompt = [random.Random(seed).randrange(vocab) for _ in range(length)]
    family = ratio_family(report)
    out: dict = {"prompt_tokens": length, "family": family, "parameters": {}, "ms": {}}
    for name, shape in SHAPES.items():
        model = random_ratio_model(family, vocab, shape, length + 256, seed)
        out["parameters"][name] = sum(p.numel() for p in model.parameters())
        out["ms"][name] = forward_costs(model, prompt, sizes, repeats)
    return out


def predict(report: dict, costs: dict) -> list[dict]:
    """One predicted row per batch-1 row of ``report`` (auto budgets and HF generate left out), with ``x_beam``
    against beam search's predicted time at the same K."""
    levels = int(report["models"]["levels"])
    trained = report["cost_model"]["ms"]
    out = []
    for row in report["rows"]:
        if row["batch_size"] != 1 or row["decoder"] == "hf_beam" or row.get("budget") == "auto":
            continue
        self_draft = row.get("draft") == "target"
        at_trained = predicted_ms_per_list(row, trained["target"], trained["target" if self_draft else "draft"], levels)
        forwards = predicted_ms_per_list(row, costs["target"], costs["target" if self_draft else "draft"], levels)
        host = max(1e3 * row["seconds_per_list"] - at_trained, 0.0)
        keys = ("decoder", "K", "N", "gamma", "budget", "draft", "target_calls_per_list", "verified_nodes_per_call")
        out.append({key: row.get(key) for key in keys} | {
            "forward_ms": forwards, "host_ms": host, "predicted_ms_per_list": forwards + host,
            "measured_ms_per_list_trained": 1e3 * row["seconds_per_list"],
        })  # fmt: skip
    beam = {r["K"]: r["predicted_ms_per_list"] for r in out if r["decoder"] == "beam"}
    for r in out:
        r["x_beam"] = beam[r["K"]] / r["predicted_ms_per_list"] if r["K"] in beam else None
    return out


def table(rows: Sequence[dict]) -> str:
    """Markdown, best first within each K."""
    columns = ["K", "decoder", "N", "gamma", "M", "calls/list", "verified/call", "forwards ms", "host ms",
               "predicted ms", "x beam (predicted)"]  # fmt: skip
    lines = []
    for row in sorted(rows, key=lambda r: (r["K"], -(r["x_beam"] or 0))):
        budget = "self" if row["draft"] == "target" else ("-" if row["budget"] is None else row["budget"])
        cells = [row["K"], row["decoder"], row["N"] or "-", row["gamma"] or "-", budget if row["N"] else "-",
                 f"{row['target_calls_per_list']:.2f}", f"{row['verified_nodes_per_call'] or 0:.1f}",
                 f"{row['forward_ms']:.1f}", f"{row['host_ms']:.1f}", f"{row['predicted_ms_per_list']:.1f}",
                 f"{row['x_beam']:.2f}x"]  # fmt: skip
        lines.append(cells)
    return markdown_table(columns, lines)
