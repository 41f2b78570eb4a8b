"""The draft-alignment study (issue 20): which drafts it trains, and the pipeline stages that train them.

Drafts: the SFT draft (loss ``none``), then per alignment loss and per seed of ``seeds`` a copy of it aligned on the
teacher data of the configs (``last``: Beauty's teacher.yaml and align.yaml take the last training sample of each user);
per loss of ``sliding_losses`` the same on the teacher data of every prefix (``sliding``, the paper's); per loss of
``on_policy_losses`` the same with on-policy batches (``model.teacher on_policy``); and a larger draft with its own SFT
stage (``none@large``), aligned from it per loss of ``large_losses``. Each aligned draft trains under
``<runs>/study/<group>/seed<s>`` with ``seed_everything``, the module's ``seed`` and the data's ``seed`` (training
order, validation subset) set to s. Every stage is a pipeline stage: one whose output exists is skipped, so a rerun
continues where a killed one stopped. Decoding: ``atspeed.bench.study_decode``; tables: ``atspeed.bench.study_tables``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from atspeed.models.build import ModelSpec
from atspeed.pipeline import Stage

NOT_ALIGNED = "none"  # loss label of the SFT drafts
# the losses of issue 20: the SFT draft, the CE control, the baselines, AtSpeed-S (ours and the authors'), AtSpeed-R
DEFAULT_LOSSES = ("sft", "word_kd", "seq_kd", "tvd_kd", "atspeed_s", "atspeed_s_authors", "atspeed_r")
# the three best strict drafts of the previous study (docs/RESULTS.md: seq_kd 2.74, atspeed_r 2.76, atspeed_s 2.77
# target calls per list at K = 10, within one standard error of each other)
DEFAULT_SLIDING_LOSSES = ("seq_kd", "atspeed_s", "atspeed_r")
DEFAULT_ON_POLICY_LOSSES = ("atspeed_s", "atspeed_r")
DEFAULT_LARGE_LOSSES = ("sft", "seq_kd", "atspeed_s", "atspeed_s_authors", "atspeed_r")
# the larger draft: a quarter of the target's width (target_sft.yaml: hidden 128, two layers), ~200 K parameters
# against the SFT draft's 23 K, so that draft capacity and alignment can be told apart
DEFAULT_LARGE_DRAFT = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_size": 128,
    "max_positions": 256,
}
SIZE_KEYS = tuple(f.name for f in dataclasses.fields(ModelSpec) if f.name != "path")
# Per-loss alignment settings. alpha: align.yaml's for every loss (0.9, the previous study's best; the paper reports
# no per-loss value we could find) except the authors' setting, which is their train.sh as a whole: ALPHA=0.7,
# CE over prompt + item + EOS, --topK 20 (overridable: small tries have fewer codes), softmax temperature 0.001.
AUTHORS_TOP_K = 20


def loss_settings(loss: str, authors_top_k: int = AUTHORS_TOP_K) -> list[str]:
    """Align arguments a loss's row of the study sets beyond align.yaml's."""
    if loss != "atspeed_s_authors":
        return []
    options = json.dumps({"top_k": authors_top_k, "support_temperature": 0.001})
    return [
        "--model.init_args.alpha",
        "0.7",
        "--model.init_args.ce_on",
        "all",
        "--model.init_args.loss_options",
        options,
    ]


TeacherData = Literal["last", "sliding"]
Size = Literal["small", "large"]


@dataclass(frozen=True)
class Draft:
    """One decoded draft. ``group`` names the setting (rows with the same group differ in seed only)."""

    loss: str  # an alignment loss, or NOT_ALIGNED for an SFT draft
    seed: int | None = None  # the alignment's seed; None for an SFT draft (trained once by its own stage)
    data: TeacherData = "last"
    on_policy: bool = False
    size: Size = "small"

    @property
    def group(self) -> str:
        suffix = ("+sliding" if self.data == "sliding" else "") + ("+on_policy" if self.on_policy else "")
        return self.loss + suffix + ("@large" if self.size == "large" else "")

    @property
    def label(self) -> str:
        return self.group if self.seed is None else f"{self.group}/seed{self.seed}"

    def path(self, runs: Path) -> Path:
        """Its Hugging Face export."""
        if self.loss == NOT_ALIGNED:
            return runs / ("draft_large" if self.size == "large" else "draft") / "hf"
        return runs / "study" / self.group / f"seed{self.seed}" / "hf"


@dataclass(frozen=True)
class StudyPlan:
    """Which losses get which variants, and the seeds of every alignment."""

    losses: tuple[str, ...] = DEFAULT_LOSSES
    seeds: tuple[int, ...] = (0, 1, 2)
    sliding_losses: tuple[str, ...] = DEFAULT_SLIDING_LOSSES
    on_policy_losses: tuple[str, ...] = DEFAULT_ON_POLICY_LOSSES
    large_losses: tuple[str, ...] = DEFAULT_LARGE_LOSSES

    def drafts(self) -> list[Draft]:
        """SFT draft first, then per variant and loss its seeds (in that order: seed 0 of everything comes before
        the others within a variant, so a partial run already covers every loss)."""
        out = [Draft(NOT_ALIGNED)]
        variants = [
            (self.losses, {}),
            (self.sliding_losses, {"data": "sliding"}),
            (self.on_policy_losses, {"on_policy": True}),
        ]
        for losses, extra in variants:
            out += [Draft(loss, seed, **extra) for seed in self.seeds for loss in dict.fromkeys(losses)]
        if self.large_losses:
            out.append(Draft(NOT_ALIGNED, size="large"))
            out += [Draft(loss, seed, size="large") for seed in self.seeds for loss in dict.fromkeys(self.large_losses)]
        return [d for d in out if d.loss != "sft" or (d.data == "last" and not d.on_policy)]  # sft: no teacher at all


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


@dataclass(frozen=True)
class StageSettings:
    """What every stage shares: config folder, run folder, alignment steps, extra CLI arguments."""

    configs: Path
    runs: Path
    steps: int | None = None
    stage_args: tuple[str, ...] = ()
    large_draft: tuple[tuple[str, object], ...] = tuple(DEFAULT_LARGE_DRAFT.items())
    authors_top_k: int = AUTHORS_TOP_K


def _teacher_dir(runs: Path, data: TeacherData) -> Path:
    return runs / ("teacher" if data == "last" else "teacher_sliding") / "data"


def _outputs(out: Path) -> list[str]:
    return [
        "--trainer.default_root_dir",
        str(out),
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.callbacks.init_args.dirpath",
        str(out / "hf"),
    ]


def align_stage(s: StageSettings, draft: Draft) -> Stage:
    """One alignment: from the SFT draft of its size, on its teacher data, seeded with its seed."""
    out = draft.path(s.runs).parent
    argv = [
        "fit",
        "--config",
        str(s.configs / "align.yaml"),
        "--model.init_args.loss",
        draft.loss,
        *loss_settings(draft.loss, s.authors_top_k),
        *_outputs(out),
    ]
    if s.steps is not None:
        argv += ["--trainer.max_steps", str(s.steps)]
    # the draft's own definition comes after --stage-args, so a value given there for every stage cannot replace it
    own = [
        "--model.init_args.target",
        str(s.runs / "target" / "hf"),
        "--model.init_args.teacher_dir",
        str(_teacher_dir(s.runs, draft.data)),
        "--model.init_args.draft_init",
        str(Draft(NOT_ALIGNED, size=draft.size).path(s.runs)),
        "--seed_everything",
        str(draft.seed),
        "--model.init_args.seed",
        str(draft.seed),
        "--data.seed",  # the training order and the validation subset (Lightning wants it equal to the model's)
        str(draft.seed),
    ]
    if draft.data == "sliding":  # else the configs' own (Beauty's: last)
        own += ["--data.train_samples", "sliding"]
    if draft.on_policy:
        own += ["--model.init_args.teacher", "on_policy"]
    return Stage(f"align {draft.label}", [*argv, *s.stage_args, *own, "--ckpt_path", "last"], out / "hf")


def study_stages(s: StageSettings, drafts: Sequence[Draft]) -> list[Stage]:
    """Target, SFT draft, teacher data (their configs write under ``runs``), the sliding teacher data and the large
    SFT draft when a draft needs them, then one alignment per aligned draft."""
    extra, configs, runs = list(s.stage_args), s.configs, s.runs
    stages = [
        Stage(
            "target",
            ["fit", "--config", str(configs / "target_sft.yaml"), "--ckpt_path", "last", *extra],
            runs / "target" / "hf",
        ),
        Stage(
            "draft",
            ["fit", "--config", str(configs / "draft_sft.yaml"), "--ckpt_path", "last", *extra],
            runs / "draft" / "hf",
        ),
        Stage(
            "teacher",
            ["predict", "--config", str(configs / "teacher.yaml"), *extra],
            _teacher_dir(runs, "last") / "manifest.json",
        ),
    ]
    if any(d.data == "sliding" for d in drafts):
        out = _teacher_dir(runs, "sliding")
        argv = [
            "predict",
            "--config",
            str(configs / "teacher.yaml"),
            *extra,
            "--data.train_samples",
            "sliding",
            "--trainer.default_root_dir",
            str(out.parent),
            "--trainer.callbacks.init_args.dirpath",
            str(out),
        ]
        stages.append(Stage("teacher sliding", argv, out / "manifest.json"))
    if any(d.size == "large" for d in drafts):
        out = Draft(NOT_ALIGNED, size="large").path(runs).parent
        sizes = json.dumps(dict(s.large_draft))
        argv = [
            "fit",
            "--config",
            str(configs / "draft_sft.yaml"),
            *extra,
            *_outputs(out),
            "--model.init_args.model",
            sizes,
            "--ckpt_path",
            "last",
        ]
        stages.append(Stage("draft large", argv, out / "hf"))
    stages += [align_stage(s, d) for d in drafts if d.loss != NOT_ALIGNED]
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
