"""Before any run starts: every run a sweep can generate parses in the CLI, and its metric is one the stage logs."""

from __future__ import annotations

import fnmatch
import pkgutil
from pathlib import Path
from typing import Any

from atspeed.cli import parse_command
from atspeed.errors import DataError
from atspeed.parsing import STAGES
from atspeed.sweep.spec import Sweep, plain, probe_values


def _module_class(class_path: str) -> type | None:
    try:
        return pkgutil.resolve_name(class_path)
    except (ImportError, AttributeError, ValueError):
        return None


def check_metric(sweep: Sweep, class_path: str) -> None:
    """The sweep's metric is among what the stage's module logs (its ``LOGGED_METRICS`` patterns, where it has
    them; a module without them is checked after its first run instead)."""
    patterns = getattr(_module_class(class_path), "LOGGED_METRICS", None)
    if patterns is None or any(fnmatch.fnmatchcase(sweep.metric, pattern) for pattern in patterns):
        return
    raise DataError(
        f"{sweep.path}: metric.name: {sweep.metric} is never logged by {class_path} (it logs {', '.join(patterns)})"
    )


def parse_run(sweep: Sweep, values: dict[str, Any], run_dir: Path) -> Any:
    """The CLI's parsed config of the run with these values, writing to ``run_dir``; ``DataError`` naming the
    sweep file and the run's parameters if the CLI would refuse it."""
    argv = sweep.argv(values)
    if not argv or argv[0] not in STAGES:
        raise DataError(f"{sweep.path}: command: `python -m atspeed` must be followed by one of {STAGES}")
    shown = ", ".join(f"{name}={plain(value)}" for name, value in values.items())
    try:
        return parse_command([*argv, f"--trainer.default_root_dir={run_dir}"])
    except DataError as err:
        raise DataError(f"{sweep.path}: the run with {shown} would stop: {err}") from None


def check_sweep(sweep: Sweep, scratch: Path) -> int:
    """Parse every probe run (``probe_values``: every categorical value and both ends of every range) and check
    the metric; returns how many runs were parsed."""
    probes = probe_values(sweep)
    for values in probes:
        config = parse_run(sweep, values, scratch)
        check_metric(sweep, config.model.class_path)
    return len(probes)
