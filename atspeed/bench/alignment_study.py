"""The draft-alignment study: train one draft per alignment loss, then time speculative decoding with each.

Training goes through ``atspeed.pipeline`` stages (an existing output is skipped, so a rerun continues): the target,
the non-aligned SFT draft and the teacher data first, then one alignment per loss starting from that SFT draft, and
per loss of a second list a draft of a second size trained from scratch. Decoding loads the target and the requests
once and swaps each draft in: spec_strict and spec_relaxed at every K with the main (N, gamma), a search over
(N, gamma) at a few K, and the references (hf_beam, beam) once per K. Rows, tables and the plot are pure functions of
the decoded rows, so they are tested on hand-made ones.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from atspeed.atomic import atomic_file
from atspeed.bench.decode_bench import REFERENCES, BenchConfig, add_speedups, build_grid, check_grid, run_grid
from atspeed.bench.report import matplotlib_available
from atspeed.bench.workload import Workload, parameters
from atspeed.data.export_dir import check_same_identifiers
from atspeed.decoding.decoders import DecoderName
from atspeed.models.build import ModelSpec, load_model
from atspeed.pipeline import Stage

log = logging.getLogger("atspeed.study")

DEFAULT_LOSSES = ("sft", "word_kd", "seq_kd", "tvd_kd", "atspeed_s", "atspeed_r")
DEFAULT_SECOND_LOSSES = ("sft", "atspeed_s")
DEFAULT_SECOND_DRAFT = {
    "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "max_positions": 256,
}  # fmt: skip
SIZE_KEYS = tuple(f.name for f in dataclasses.fields(ModelSpec) if f.name != "path")
STUDIED: tuple[DecoderName, ...] = ("spec_strict", "spec_relaxed")  # the paper's two rules (tables, plot panels)
NOT_ALIGNED = "none"  # loss label of the SFT draft


@dataclass(frozen=True)
class Draft:
    """One decoded draft: ``label`` names it in rows and tables (``<loss>`` or ``<loss>@<size tag>``)."""

    label: str
    loss: str  # an alignment loss, or NOT_ALIGNED for the SFT draft
    path: Path  # its export
    sizes: dict | None = None  # trained from scratch with these sizes; None: from (or as) the SFT draft


def size_tag(sizes: dict) -> str:
    """``h<hidden>l<layers>`` of a draft's sizes (ModelSpec's defaults where a size is not given)."""
    return f"h{sizes.get('hidden_size', ModelSpec.hidden_size)}l{sizes.get('num_layers', ModelSpec.num_layers)}"


def check_sizes(sizes: object) -> dict:
    """A JSON object of draft sizes (``ModelSpec`` fields but ``path``), or ValueError naming what is wrong."""
    if not isinstance(sizes, dict):
        raise ValueError(f"expected a JSON object of draft sizes, got {sizes!r}")
    unknown = sorted(set(sizes) - set(SIZE_KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown} (expected some of {', '.join(SIZE_KEYS)})")
    try:
        ModelSpec(**sizes)
    except (TypeError, ValueError) as err:
        raise ValueError(str(err)) from None
    return sizes


def study_drafts(runs: Path, losses: Sequence[str], second_losses: Sequence[str], second: dict) -> list[Draft]:
    """The SFT draft, one aligned draft per loss, then one per loss of ``second_losses`` at the second size."""
    drafts = [Draft(NOT_ALIGNED, NOT_ALIGNED, runs / "draft" / "hf")]
    drafts += [Draft(loss, loss, runs / "study" / loss / "hf") for loss in dict.fromkeys(losses)]
    for loss in dict.fromkeys(second_losses):
        label = f"{loss}@{size_tag(second)}"
        drafts.append(Draft(label, loss, runs / "study" / label / "hf", second))
    return drafts


def _align_stage(configs: Path, runs: Path, draft: Draft, steps: int | None, stage_args: list[str]) -> Stage:
    out = runs / "study" / draft.label
    target = str(runs / "target" / "hf")
    argv = [
        "fit", "--config", str(configs / "align.yaml"),
        "--model.init_args.loss", draft.loss,
        "--model.init_args.target", target,
        "--model.init_args.teacher_dir", str(runs / "teacher" / "data"),
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.callbacks.init_args.dirpath", str(out / "hf"),
    ]  # fmt: skip
    if steps is not None:
        argv += ["--trainer.max_steps", str(steps)]
    # the draft's own definition comes after --stage-args, so a path given there for the others cannot replace it
    if draft.sizes is None:
        start = ["--model.init_args.draft_init", str(runs / "draft" / "hf")]
    else:
        start = ["--model.init_args.draft_init", "null", "--model.init_args.draft", json.dumps(draft.sizes)]
    return Stage(f"align {draft.label}", [*argv, *stage_args, *start, "--ckpt_path", "last"], out / "hf")


def study_stages(
    configs: Path, runs: Path, drafts: Sequence[Draft], steps: int | None = None, stage_args: Sequence[str] = ()
) -> list[Stage]:
    """Target, SFT draft and teacher data (their configs write under ``runs``), then one alignment per aligned draft."""
    extra = list(stage_args)
    stages = [
        Stage("target", ["fit", "--config", str(configs / "target_sft.yaml"), "--ckpt_path", "last", *extra],
              runs / "target" / "hf"),
        Stage("draft", ["fit", "--config", str(configs / "draft_sft.yaml"), "--ckpt_path", "last", *extra],
              runs / "draft" / "hf"),
        Stage("teacher", ["predict", "--config", str(configs / "teacher.yaml"), *extra],
              runs / "teacher" / "data" / "manifest.json"),
    ]  # fmt: skip
    stages += [_align_stage(configs, runs, d, steps, extra) for d in drafts if d.loss != NOT_ALIGNED]
    return stages


def missing_configs(stages: Sequence[Stage]) -> list[str]:
    """Config files of the stages still to run that do not exist (a skipped stage needs none)."""
    wanted = [s.argv[s.argv.index("--config") + 1] for s in stages if not s.output.exists() and "--config" in s.argv]
    return [path for path in dict.fromkeys(wanted) if not Path(path).is_file()]


def last_validation(run_dir: Path) -> dict[str, float]:
    """The last non-empty value of every ``val/...`` column of the run's CSV logs (versions in order)."""

    def version(path: Path) -> int:
        number = path.parent.name.removeprefix("version_")
        return int(number) if number.isdigit() else -1

    found: dict[str, float] = {}
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv"), key=version):
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                found |= {k: float(v) for k, v in row.items() if k and k.startswith("val/") and v not in (None, "")}
    return found


# -- decoding -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyGrid:
    """The main (N, gamma) at every K of ``ks``; every (N, gamma) of the search at every K of ``search_ks``."""

    ks: tuple[int, ...]
    draft_beams: int
    gamma: int
    search_ks: tuple[int, ...]
    search_draft_beams: tuple[int, ...]
    search_gammas: tuple[int, ...]

    def check(self, requests: int) -> None:
        """ValueError naming the flag when a value is out of range."""
        main = {"--gammas": "--gamma"}
        search = {"--ks": "--search-ks", "--draft-beams": "--search-draft-beams", "--gammas": "--search-gammas"}
        for flags, grid in ((main, (self.ks, [1], [self.draft_beams], [self.gamma])),
                             (search, (self.search_ks, [1], self.search_draft_beams, self.search_gammas))):  # fmt: skip
            try:
                check_grid(*grid, [requests])
            except ValueError as err:  # check_grid names bench_decode's flags
                flag, _, rest = str(err).partition(":")
                raise ValueError(f"{flags.get(flag, flag)}:{rest}") from None

    def references(self) -> list[BenchConfig]:
        return build_grid(REFERENCES, sorted({*self.ks, *self.search_ks}), [1], [], [])

    def speculative(self) -> list[BenchConfig]:
        main = build_grid(STUDIED, self.ks, [1], [self.draft_beams], [self.gamma])
        search = build_grid(STUDIED, self.search_ks, [1], self.search_draft_beams, self.search_gammas)
        return sorted(dict.fromkeys(main + search), key=lambda c: c.k)  # one timing group per K

    def searched(self, row: dict) -> bool:
        return (
            row["decoder"] in STUDIED and row["K"] in self.search_ks
            and row["N"] in self.search_draft_beams and row["gamma"] in self.search_gammas
        )  # fmt: skip

    @property
    def table_k(self) -> int:
        """The K of the main table: 10 (the paper's) when searched, else the largest searched K."""
        return 10 if 10 in self.search_ks else max(self.search_ks)


def with_draft(work: Workload, path: Path, dtype: str, device: torch.device) -> Workload:
    """The workload with the draft exported at ``path`` (same identifiers and tokenizer as the target)."""
    check_same_identifiers(work.info["target"], str(path), f"draft {path}")
    return dataclasses.replace(work, draft=load_model(path, dtype).to(device))


def study_row(raw: dict, draft: Draft | None = None, draft_parameters: int | None = None) -> dict:
    """A study row from a ``run_grid`` row (after ``add_speedups``); references have no draft."""
    return {
        "loss": draft.loss if draft else None,
        "draft": draft.label if draft else None,
        "draft_parameters": draft_parameters,
        "decoder": raw["decoder"],
        "K": raw["K"],
        "N": raw["N"],
        "gamma": raw["gamma"],
        "lists": raw["lists"],
        "target_calls_per_list": raw["target_calls_per_list"],
        "draft_calls_per_list": raw["draft_calls_per_list"],
        "accepted_depth": raw["mean_accepted_depth"],
        "ms_per_list": 1e3 * raw["seconds_per_list"],
        "ms_per_list_repeats": [1e3 * s for s in raw["seconds_per_list_repeats"]],
        "x_beam": raw["speedup_vs_beam"],
        "x_hf": raw["speedup_vs_hf"],
        "recall": raw["recall_at_k"],
        "ndcg": raw["ndcg_at_k"],
        "equals_hf": raw["equals_hf"],
        "accepted_histogram": raw["accepted_histogram"],
        "draft_fraction": raw["draft_fraction"],
        "best": False,
    }


def mark_best(rows: list[dict], grid: StudyGrid) -> None:
    """``best``: the fastest searched (N, gamma) of each (draft, decoder, K); ``equals_beam`` for spec_strict."""
    fastest: dict[tuple, dict] = {}
    for row in rows:
        row["best"] = False
        if grid.searched(row):
            key = (row["draft"], row["decoder"], row["K"])
            if key not in fastest or row["ms_per_list"] < fastest[key]["ms_per_list"]:
                fastest[key] = row
    for row in fastest.values():
        row["best"] = True
    beam = {r["K"]: r for r in rows if r["decoder"] == "beam"}
    for row in rows:
        ref = beam.get(row["K"])
        same = ref is not None and (row["recall"], row["ndcg"]) == (ref["recall"], ref["ndcg"])
        row["equals_beam"] = same if row["decoder"] == "spec_strict" else None


@dataclass(frozen=True)
class Timing:
    """How each configuration is timed (``run_grid``) and in which dtype drafts load."""

    device: torch.device
    repeats: int = 1
    warmup: int = 1
    seed: int = 0
    dtype: str = "float32"


def decode_study(
    work: Workload,
    drafts: Sequence[Draft],
    grid: StudyGrid,
    timing: Timing,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """References once, then every draft swapped into ``work`` (batch size 1, all of ``work``'s requests)."""
    t = timing
    run = {"requests": {1: len(work.prompts)}, "device": t.device, "repeats": t.repeats, "warmup": t.warmup,
           "seed": t.seed, "progress": progress}  # fmt: skip
    tagged = [(None, None, raw) for raw in run_grid(grid.references(), work, **run)]
    for draft in drafts:
        here = work if Path(work.info["draft"]) == draft.path else with_draft(work, draft.path, t.dtype, t.device)
        count = parameters(here.draft)
        log.info("draft %s (%s): %d parameters", draft.label, draft.path, count)
        tagged += [(draft, count, raw) for raw in run_grid(grid.speculative(), here, **run)]
    add_speedups([raw for _, _, raw in tagged])
    rows = [study_row(raw, draft, count) for draft, count, raw in tagged]
    mark_best(rows, grid)
    return rows


# -- tables and the plot ----------------------------------------------------------------------------------------


def _labels(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["draft"] for r in rows if r["draft"] is not None))


def _find(rows: list[dict], **where) -> dict | None:
    return next((r for r in rows if all(r[k] == v for k, v in where.items())), None)


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def results_table(rows: list[dict], k: int, n: int, gamma: int) -> str:
    """Markdown: one line per draft; per decoder at K (N, gamma) calls/list, accepted depth, ms/list, x beam, x HF,
    then the fastest searched (N, gamma) at K and its ms/list; references below."""
    short = {"spec_strict": "strict", "spec_relaxed": "relaxed"}
    header = ["draft", "params"]
    for decoder in STUDIED:
        s = short[decoder]
        header += [f"{s} calls/list", f"{s} accepted", f"{s} ms/list", f"{s} x beam", f"{s} x HF",
                   f"{s} best (N, γ)", f"{s} best ms/list"]  # fmt: skip
    header.append(f"relaxed R@{k}")
    body = []
    for label in _labels(rows):
        mine = [r for r in rows if r["draft"] == label]
        cells = [label, _fmt(mine[0]["draft_parameters"], ",d")]
        for decoder in STUDIED:
            row = _find(mine, decoder=decoder, K=k, N=n, gamma=gamma) or {}
            cells += [_fmt(row.get(key)) for key in ("target_calls_per_list", "accepted_depth", "ms_per_list")]
            cells += [_fmt(row.get(key)) for key in ("x_beam", "x_hf")]
            best = _find(mine, decoder=decoder, K=k, best=True)
            cells += [f"({best['N']}, {best['gamma']})", _fmt(best["ms_per_list"])] if best else ["-", "-"]
        cells.append(_fmt((_find(mine, decoder="spec_relaxed", K=k, N=n, gamma=gamma) or {}).get("recall"), ".4f"))
        body.append(cells)
    table = _markdown(header, body)
    refs = [r for r in rows if r["draft"] is None and r["K"] == k]
    notes = [f"{r['decoder']}: {_fmt(r['ms_per_list'])} ms/list, {_fmt(r['target_calls_per_list'])} calls/list, "
             f"R@{k} {_fmt(r['recall'], '.4f')}" for r in refs]  # fmt: skip
    title = f"K = {k}, N = {n}, γ = {gamma} (best: fastest searched (N, γ) at K = {k})"
    return "\n".join([title, "", table, "", *(f"- {note}" for note in notes)])


def calls_table(rows: list[dict], n: int, gamma: int) -> str:
    """Markdown: target calls per list by K (N, gamma) for spec_strict and spec_relaxed; beam search's last."""
    short = {"spec_strict": "strict", "spec_relaxed": "relaxed"}
    ks = sorted({r["K"] for r in rows if r["decoder"] in STUDIED and (r["N"], r["gamma"]) == (n, gamma)})
    header = ["draft"] + [f"{short[d]} K={k}" for d in STUDIED for k in ks]
    body = []
    for label in _labels(rows):
        cells = [label]
        for decoder in STUDIED:
            found = (_find(rows, draft=label, decoder=decoder, K=k, N=n, gamma=gamma) for k in ks)
            cells += [_fmt(r["target_calls_per_list"] if r else None) for r in found]
        body.append(cells)
    beam = [_fmt((_find(rows, draft=None, decoder="beam", K=k) or {}).get("target_calls_per_list")) for k in ks]
    body.append(["beam search", *beam, *beam])
    return "\n".join([f"Target calls per list (N = {n}, γ = {gamma})", "", _markdown(header, body)])


def plot_calls(path: str | Path, rows: list[dict], n: int, gamma: int, title: str) -> bool:
    """PNG: target calls per list against K, one panel per speculative decoder, one line per draft, beam search
    dashed; False without matplotlib."""
    if not matplotlib_available():
        return False
    from matplotlib.figure import Figure  # a bare Figure renders through Agg: no pyplot, no global backend

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    beam = sorted((r["K"], r["target_calls_per_list"]) for r in rows if r["decoder"] == "beam")
    for ax, decoder in zip(axes, STUDIED, strict=True):
        for label in _labels(rows):
            points = sorted(
                (r["K"], r["target_calls_per_list"]) for r in rows
                if r["draft"] == label and r["decoder"] == decoder and (r["N"], r["gamma"]) == (n, gamma)
            )  # fmt: skip
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.plot([p[0] for p in beam], [p[1] for p in beam], "--", color="black", label="beam search (L calls)")
        ks = sorted({p[0] for p in beam})
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("K (list length = beams)")
        ax.set_title(f"{decoder}, N = {n}, γ = {gamma}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("target calls per list")
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    with atomic_file(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return True
