"""The sweep's results: a table (printed, ``results.csv``, ``results.json``) and ``<metric>.png``, the metric
against each parameter (one panel per parameter, the best run marked)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from atspeed.atomic import atomic_file, write_text_atomic
from atspeed.errors import DataError
from atspeed.sweep.runner import SweepState
from atspeed.sweep.spec import Sweep
from atspeed.tables import text_table


def check_plotting() -> None:
    """The PNG needs matplotlib: say so before any run starts."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DataError("the sweep's plot needs matplotlib: pip install -e '.[sweeps]'") from None


def rows(sweep: Sweep, state: SweepState) -> list[dict]:
    """One row per run: name, state, each parameter, the metric (None until finished), in run order."""
    return [
        {"run": run.name, "state": run.state, **run.values, sweep.metric: run.metric(sweep.metric)}
        for run in state.runs
    ]


def best(sweep: Sweep, state: SweepState):
    """The finished run with the best metric (per ``metric.goal``), or None."""
    scored = [run for run in state.finished if run.metric(sweep.metric) is not None]
    if not scored:
        return None
    sign = -1.0 if sweep.goal == "maximize" else 1.0
    return min(scored, key=lambda run: sign * run.metric(sweep.metric))


def table_text(table: list[dict]) -> str:
    """A text table of ``rows``."""
    if not table:
        return "(no runs)"
    columns = list(dict.fromkeys(key for row in table for key in row))

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    return text_table(columns, ([cell(row.get(c)) for c in columns] for row in table), left=len(columns))


def _write_csv(path: Path, table: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in table for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(table)
    write_text_atomic(path, buffer.getvalue())


def plot(sweep: Sweep, state: SweepState, path: Path) -> None:
    """The metric of each finished run against each parameter (categories on their own positions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sweep.parameters)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    scored = [run for run in state.finished if run.metric(sweep.metric) is not None]
    top = best(sweep, state)
    for ax, name in zip(axes[0], names, strict=True):
        values = [run.values.get(name) for run in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = sorted({str(v) for v in values})
        xs = values if numeric else [labels.index(str(v)) for v in values]
        ax.scatter(xs, [run.metric(sweep.metric) for run in scored], color="tab:blue")
        if top is not None:
            x = top.values.get(name) if numeric else labels.index(str(top.values.get(name)))
            ax.scatter([x], [top.metric(sweep.metric)], color="tab:red", marker="*", s=160, label="best")
            ax.legend(loc="best", fontsize=8)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(name.split(".")[-1])
        ax.set_ylabel(sweep.metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{sweep.name} ({sweep.method}, {len(scored)} runs, goal: {sweep.goal})")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(sweep: Sweep, state: SweepState, out_dir: Path) -> str:
    """Write the table (CSV and JSON) and the PNG into ``out_dir``; returns the printed text."""
    table = rows(sweep, state)
    _write_csv(out_dir / "results.csv", table)
    top = best(sweep, state)
    summary = {
        "sweep": str(sweep.path),
        "method": sweep.method,
        "metric": sweep.metric,
        "goal": sweep.goal,
        "best": None if top is None else {"run": top.name, **top.values, sweep.metric: top.metric(sweep.metric)},
        "runs": table,
    }
    write_text_atomic(out_dir / "results.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    plot(sweep, state, out_dir / f"{_file_name(sweep.metric)}.png")
    text = table_text(table)
    if top is not None:
        text += f"\nbest: {top.name} ({sweep.metric} = {top.metric(sweep.metric):.4g})"
    return text


def _file_name(metric: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in metric) or "metric"
