"""scripts/slurm.sbatch run as Slurm would, with fake ``srun`` and ``scontrol`` on PATH that record their arguments:
srun ends the step when one task fails and gives each task the job's CPUs; a run stopped by SIGTERM (exit 143) is
requeued, and a finished or failed one is not."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.integration.tiny_data import ROOT

SCRIPT = ROOT / "scripts/slurm.sbatch"
FAKE = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$RECORD/{name}.args"
printf '%s\\n' "${{SRUN_CPUS_PER_TASK:-unset}}" > "$RECORD/{name}.cpus"
exit "${{FAKE_EXIT:-0}}"
"""


def _sbatch(tmp_path: Path, srun_exit: int) -> tuple[subprocess.CompletedProcess, Path]:
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name in ("srun", "scontrol"):
        path = bin_dir / name
        path.write_text(FAKE.format(name=name))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record), "PYTHON": "python3",
           "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
           "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "12", "FAKE_EXIT": str(srun_exit)}  # fmt: skip
    env.pop("SRUN_CPUS_PER_TASK", None)
    done = subprocess.run(["bash", str(SCRIPT), "fit", "--config", "c.yaml"], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    return done, record


@pytest.mark.parametrize("code", [0, 1, 143])
def test_srun_kills_on_bad_exit_and_only_a_sigterm_stop_is_requeued(tmp_path, code: int) -> None:
    done, record = _sbatch(tmp_path, code)
    assert done.returncode == code, done.stderr
    srun = (record / "srun.args").read_text().splitlines()
    assert srun[0] == "--kill-on-bad-exit=1"
    assert srun[1:] == ["python3", "-m", "atspeed", "fit", "--config", "c.yaml", "--trainer.num_nodes", "2",
                        "--trainer.devices", "8"]  # fmt: skip
    assert (record / "srun.cpus").read_text().strip() == "12"  # exported for srun (Slurm >= 22.05)
    requeued = (record / "scontrol.args").read_text().splitlines() if (record / "scontrol.args").exists() else None
    assert requeued == (["requeue", "4242"] if code == 143 else None)


def test_the_tasks_get_sigterm_before_the_limit_and_the_job_may_requeue() -> None:
    """--signal without B: signals the job steps' tasks (the Python processes), not the batch shell blocked in
    srun; --requeue lets scontrol requeue the job."""
    directives = [line.split()[1] for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "--signal=TERM@120" in directives and "--requeue" in directives and "--open-mode=append" in directives
