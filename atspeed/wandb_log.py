"""Weights & Biases outputs: the predict stage's tables (through Lightning's ``WandbLogger``) and the decoding
benchmark's own run (its rows as a table, its plot as an image).

``wandb`` is imported only when something is logged to it. A benchmark run is offline unless W&B is told otherwise:
``WANDB_MODE`` when set, else online only when an API key is configured (``WANDB_API_KEY``, or the ``.netrc`` entry
that ``wandb login`` writes). Offline runs land in ``<dir>/wandb/offline-run-*``; ``wandb sync <that dir>`` uploads
one later. (Offline runs keep their history in the ``run-*.wandb`` file and media under ``files/media``; they write
no ``wandb-summary.json``.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

DEFAULT_HOST = "https://api.wandb.ai"


def log_predict_tables(loggers: Iterable[Logger], row: dict[str, Any], histogram: list[int] | None, step: int) -> int:
    """To each ``WandbLogger`` among ``loggers``: the table ``decode/stats`` (``row``: settings and summary numbers)
    and, for a speculative decoder, ``decode/accepted_depths`` (verification calls that accepted each depth 0..gamma).
    Returns how many loggers got them."""
    sent = 0
    for logger in loggers:
        if not isinstance(logger, LightningWandbLogger):
            continue
        logger.log_table("decode/stats", columns=list(row), data=[list(row.values())], step=step)
        if histogram is not None:
            depths = [[depth, calls] for depth, calls in enumerate(histogram)]
            logger.log_table("decode/accepted_depths", columns=["depth", "calls"], data=depths, step=step)
        sent += 1
    return sent


def api_key_configured(env: Mapping[str, str]) -> bool:
    """Whether W&B would find an API key: ``WANDB_API_KEY``, else wandb's own reader of the ``.netrc`` entry."""
    if env.get("WANDB_API_KEY"):
        return True
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth
    except ImportError:  # a wandb without this reader: only the environment counts
        return False
    return read_netrc_auth(host=env.get("WANDB_BASE_URL") or DEFAULT_HOST) is not None


def wandb_mode(env: Mapping[str, str] | None = None) -> str:
    """``WANDB_MODE`` when set; else ``online`` when an API key is configured, ``offline`` when not."""
    env = os.environ if env is None else env
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    return "online" if api_key_configured(env) else "offline"


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger``, offline unless W&B would log online: ``WANDB_MODE`` when set, else online only
    with an API key configured (``wandb login``). ``offline: true`` / ``false`` forces it, as in Lightning."""

    def __init__(self, *args: Any, offline: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, offline=wandb_mode() == "offline" if offline is None else offline, **kwargs)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, int | float) else type(value).__name__


def table_data(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Dict rows as W&B table columns and data. W&B types each column from its values, so lists become JSON text
    and a column whose values mix kinds (the budget: none, 20, auto) becomes text; None stays empty."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    data = [[json.dumps(v) if isinstance(v, list | dict) else v for v in (row.get(c) for c in columns)] for row in rows]
    for j in range(len(columns)):
        if len({_kind(row[j]) for row in data if row[j] is not None}) > 1:
            for row in data:
                row[j] = None if row[j] is None else str(row[j])
    return columns, data


def log_bench_run(
    report: dict[str, Any],
    images: Mapping[str, Path],
    project: str,
    entity: str | None = None,
    directory: str | Path = "runs/wandb",
) -> Path:
    """One W&B run (job type ``bench``) holding the benchmark's rows as the table ``bench/rows`` and each image file
    as ``bench/<name>``; its config is the report's settings, machine and models. Returns the run's directory."""
    import wandb

    Path(directory).mkdir(parents=True, exist_ok=True)
    config = {key: report.get(key) for key in ("benchmark", "preset", "settings", "machine", "models")}
    run = wandb.init(project=project, entity=entity, dir=str(directory), mode=wandb_mode(), job_type="bench",
                     config=config, reinit="create_new")  # fmt: skip
    try:
        columns, data = table_data(report["rows"])
        payload: dict[str, Any] = {"bench/rows": wandb.Table(columns=columns, data=data)}
        payload |= {f"bench/{name}": wandb.Image(str(path)) for name, path in images.items()}
        run.log(payload)
        where = Path(run.dir).parent
    finally:
        run.finish()
    return where
