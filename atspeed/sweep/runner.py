"""The offline sweep loop: W&B's own search engine (the ``sweeps`` package) picks each run's parameters, the run is
the sweep file's command in a fresh process, and ``state.json`` records every run so that a stopped sweep resumes.

Each run gets ``--trainer.default_root_dir=<dir>/<run>`` and ``--summary.path=<dir>/<run>/summary.json`` after the
sweep's own arguments, ``WANDB_RUN_ID`` (as W&B's agent sets it) and ``WANDB_MODE=offline`` unless set. Its output
goes to ``<dir>/logs/<run>.log``. A run that did not finish (stopped, killed, failed) is run again first on resume,
with the same parameters; with ``--ckpt_path last`` in the command a fit continues from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from atspeed.atomic import write_text_atomic
from atspeed.data.json_file import read_json, validated
from atspeed.errors import SIGTERM_EXIT, DataError
from atspeed.sweep.spec import Sweep, plain

log = logging.getLogger("atspeed.sweep")
STATE_FILE = "state.json"


class RunFailed(RuntimeError):
    """A run exited with an error (its log says why); ``code`` is its exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class RunRecord:
    """One run of the sweep: its parameters, how it ended, its final metrics."""

    name: str
    values: dict[str, Any]
    state: str = "running"  # running (or stopped before finishing) | finished | failed
    summary: dict[str, float] = field(default_factory=dict)

    def metric(self, name: str) -> float | None:
        return self.summary.get(name)


class StateFile(BaseModel):
    """What ``state.json`` holds (``SweepState.save`` writes it)."""

    sweep_id: str
    config: dict
    runs: list[RunRecord]


@dataclass
class SweepState:
    """``<dir>/state.json``: the sweep's identity (its file's content) and its runs so far."""

    sweep_id: str
    config: dict
    runs: list[RunRecord]

    @classmethod
    def load(cls, out_dir: Path, sweep: Sweep) -> SweepState:
        path = out_dir / STATE_FILE
        if not path.is_file():
            return cls(uuid.uuid4().hex[:8], sweep.config, [])
        raw = validated(StateFile, read_json(path, "sweep state file"), path)
        state = cls(raw.sweep_id, raw.config, raw.runs)
        if state.config != sweep.config:
            raise DataError(
                f"{path}: this directory holds a sweep of another configuration than {sweep.path} now has; resume "
                "with the file as it was, or give --dir another directory"
            )
        return state

    def save(self, out_dir: Path) -> None:
        raw = {"sweep_id": self.sweep_id, "config": self.config, "runs": [asdict(run) for run in self.runs]}
        write_text_atomic(out_dir / STATE_FILE, json.dumps(raw, indent=2) + "\n")

    @property
    def finished(self) -> list[RunRecord]:
        return [run for run in self.runs if run.state == "finished"]


def next_values(sweep: Sweep, state: SweepState) -> dict[str, Any] | None:
    """The search engine's next parameters given the finished runs (None: a grid is exhausted)."""
    import sweeps

    history = [
        sweeps.SweepRun(
            name=run.name,
            state=sweeps.RunState.finished,
            config={name: {"value": value} for name, value in run.values.items()},
            summary_metrics=run.summary,
        )
        for run in state.finished
    ]
    with warnings.catch_warnings():  # bayes fits a Gaussian process to few points: its fit warnings are expected
        warnings.filterwarnings("ignore", module="sklearn")
        proposed = sweeps.next_run(sweep.config, history, validate=False)
    if proposed is None:
        return None
    return {name: plain(spec["value"]) for name, spec in proposed.config.items()}


def _stop_child(signum, frame) -> None:
    raise KeyboardInterrupt  # handled like Ctrl-C: the child is stopped, the run stays unfinished


def execute(sweep: Sweep, run: RunRecord, state: SweepState, out_dir: Path) -> None:
    """Run ``run`` in a fresh process and record its summary (``RunFailed`` if it does not finish)."""
    run_dir = out_dir / run.name
    summary_path = run_dir / "summary.json"
    argv = [*sweep.argv(run.values), f"--trainer.default_root_dir={run_dir}", f"--summary.path={summary_path}"]
    env = {**os.environ, "WANDB_RUN_ID": f"{state.sweep_id}-{run.name}"}
    env.setdefault("WANDB_MODE", "offline")
    log_path = out_dir / "logs" / f"{run.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.unlink(missing_ok=True)
    with open(log_path, "a", encoding="utf-8") as out:
        out.write(f"$ python -m atspeed {' '.join(argv)}\n")
        out.flush()
        child = subprocess.Popen(
            [sys.executable, "-m", "atspeed", *argv], stdout=out, stderr=subprocess.STDOUT, env=env
        )
        previous = signal.signal(signal.SIGTERM, _stop_child)
        try:
            code = child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGTERM)
            child.wait()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
    if code != 0 or not summary_path.is_file():
        run.state = "failed" if code not in (0, SIGTERM_EXIT) else "running"
        raise RunFailed(f"run {run.name} exited with status {code}: see {log_path}", code or 1)
    run.summary = json.loads(summary_path.read_text(encoding="utf-8"))
    if sweep.metric not in run.summary:
        run.state = "failed"
        logged = ", ".join(run.summary) or "nothing"
        raise DataError(f"{sweep.path}: metric.name: run {run.name} never logged {sweep.metric} (it logged {logged})")
    run.state = "finished"


def run_sweep(sweep: Sweep, out_dir: Path, count: int | None) -> SweepState:
    """Run the sweep until ``count`` runs have finished (or a grid is exhausted), resuming ``out_dir``'s state."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = SweepState.load(out_dir, sweep)
    while count is None or len(state.finished) < count:
        run = next((r for r in state.runs if r.state != "finished"), None)
        if run is None:
            values = next_values(sweep, state)
            if values is None:
                break
            run = RunRecord(f"run-{len(state.runs):03d}", values)
            state.runs.append(run)
        shown = ", ".join(f"{name}={value}" for name, value in run.values.items())
        log.info("%s: %s", run.name, shown)
        run.state = "running"
        state.save(out_dir)
        try:
            execute(sweep, run, state, out_dir)
        finally:
            state.save(out_dir)
        log.info("%s: %s = %s", run.name, sweep.metric, run.metric(sweep.metric))
    return state
