"""``python -m atspeed sweep FILE [--count N] [--dir DIR]``: run a W&B sweep file with no W&B server.

The same ``sweeps/*.yaml`` runs on W&B (``wandb sweep FILE``, then ``wandb agent ENTITY/PROJECT/ID``) and here:
W&B's own search engine (the ``sweeps`` package, grid / random / bayes) proposes each run's parameters from the
finished runs, and each run is the file's ``command`` (``python -m atspeed ...`` with ``--<parameter>=<value>``) in
a fresh process. Before any run starts the file is checked against W&B's sweep schema, every value a run can get
is parsed by the CLI (a parameter that is not a CLI key, a value the CLI refuses), and the metric must be one the
stage logs. Outputs in ``--dir`` (default ``runs/sweeps/<file name>``): each run's directory and log, ``state.json``
(rerunning the same command resumes: unfinished runs first, then new ones up to ``--count`` finished runs),
``results.csv`` / ``results.json`` (the table, best run) and ``<metric>.png`` (the metric against each parameter).

The options are ``sweep_options``'s typed signature, parsed by jsonargparse like every command (``--help``,
``--print_config``, ``--config FILE`` holding ``file``, ``count``, ``dir``): ``--count 0`` stops while parsing.

One sweep per directory: ``--dir`` is locked while the sweep runs (``atspeed.run_lock``). Exit codes: 0 done; 2 bad
input (one message naming the file and key; ``--dir`` in use by another sweep); 1 a run failed (its log is named;
rerun to resume); 143 stopped by SIGTERM (the unfinished run is rerun on resume).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from jsonargparse.typing import PositiveInt

from atspeed.errors import SIGTERM_EXIT, DataError


def sweep_options(file: str, count: PositiveInt | None = None, dir: str | None = None) -> None:
    """A sweep's run.

    Args:
        file: a W&B sweep YAML (sweeps/*.yaml).
        count: finished runs to reach (needed by random and bayes; a grid stops when every point has run).
        dir: the output directory (default runs/sweeps/<file name without .yaml>).
    """


def _parser():
    from atspeed.parsing import command_parser

    parser = command_parser("python -m atspeed sweep", __doc__.split("\n\n")[0])
    parser.add_function_arguments(sweep_options, as_positional=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Check, run and tabulate a sweep; returns the exit code (see the module docstring)."""
    from atspeed.parsing import parse

    log = logging.getLogger("atspeed.sweep")
    try:
        args = parse(_parser(), sys.argv[1:] if argv is None else argv)  # before the CLI's imports: --help at once
        from atspeed.cli import show_atspeed_logs
        from atspeed.run_lock import locked
        from atspeed.sweep.spec import read_sweep

        show_atspeed_logs()
        sweep = read_sweep(args.file, args.count)
        out_dir = Path(args.dir) if args.dir else Path("runs/sweeps") / sweep.name
        with locked(out_dir, "--dir"):  # one sweep per directory; its runs lock their own directories inside it
            return _run(sweep, out_dir, args.count, log)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(sweep, out_dir: Path, count: int | None, log: logging.Logger) -> int:
    """Check and run the sweep in ``out_dir`` (locked), then write its report; DataError for bad input."""
    from atspeed.sweep.check import check_sweep
    from atspeed.sweep.report import check_plotting, write_report
    from atspeed.sweep.runner import RunFailed, run_sweep

    try:
        check_plotting()
        probes = check_sweep(sweep, out_dir / ".check")
        log.info("%s: %d probe runs parse in the CLI; metric %s (%s)", sweep.path, probes, sweep.metric, sweep.goal)
        state = run_sweep(sweep, out_dir, count)
    except RunFailed as err:
        print(f"error: {err}; rerun the same command to resume", file=sys.stderr)
        return SIGTERM_EXIT if err.code == SIGTERM_EXIT else 1
    except KeyboardInterrupt:
        print("sweep stopped: rerun the same command to resume", file=sys.stderr)
        return SIGTERM_EXIT
    print(write_report(sweep, state, out_dir))
    log.info("wrote %s/results.csv, results.json and the plot", out_dir)
    return 0
