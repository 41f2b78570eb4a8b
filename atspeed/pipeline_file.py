"""A pipeline file (``configs/*/pipeline.yaml``) is the ``pipeline`` command's config: its schema is the typed
signature of ``pipeline_options``, parsed by jsonargparse like every command (``--help``, ``--print_config``,
``--config FILE``; ``pipeline FILE`` is ``pipeline --config FILE``), then checked for what a schema cannot say (unique
names, commands that are atspeed stages)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace
from jsonargparse.typing import NotEmptyStr

from atspeed.errors import DataError
from atspeed.parsing import STAGES, command_parser, config_files, parse
from atspeed.yaml_file import read_yaml


@dataclass(frozen=True)
class StageEntry:
    """A stage of a pipeline file.

    Args:
        name: the stage's name, unique in the file.
        run: what follows ``python -m atspeed``: a command line (or the list of its words) starting with one of
            fit, validate, test, predict.
        output: the path that only a finished run of the stage leaves (an export directory, a ``manifest.json``, a
            ``report.json``): the stage is skipped when it exists.
    """

    name: NotEmptyStr
    run: str | list[str]
    output: NotEmptyStr


def pipeline_options(stages: list[StageEntry], summary: str | None = None) -> None:
    """A pipeline file's keys.

    Args:
        stages: the stages, run in order.
        summary: where to write the summary of the decode stages' reports as JSON (null: printed only).
    """


@dataclass(frozen=True)
class Stage:
    name: str
    argv: list[str]  # what follows ``python -m atspeed``
    output: Path

    @property
    def command(self) -> str:
        return shlex.join(["python", "-m", "atspeed", *self.argv])


@dataclass(frozen=True)
class Pipeline:
    stages: list[Stage]
    summary: Path | None


def pipeline_parser() -> ArgumentParser:
    about = (
        "Run atspeed stages in order, skipping those whose output exists, then summarise their decode reports. "
        "`pipeline FILE` reads the pipeline file FILE as --config FILE: its keys are the options below."
    )
    parser = command_parser("python -m atspeed pipeline", about)
    parser.add_function_arguments(pipeline_options, as_positional=False)
    return parser


def pipeline_args(args: Sequence[str]) -> list[str]:
    """The command's arguments with the positional form ``FILE ...`` as ``--config FILE ...``."""
    args = list(args)
    return ["--config", *args] if args and not args[0].startswith("-") else args


def file_label(args: Sequence[str]) -> str:
    """What names the pipeline in messages and its lock: the last ``--config`` file (``pipeline`` without one)."""
    files = list(config_files(args))
    return str(files[-1]) if files else "pipeline"


def parse_pipeline(args: Sequence[str]) -> Pipeline:
    """The pipeline that the command's arguments describe; bad input raises ``DataError`` naming the file and key.
    ``--help`` and ``--print_config`` print and exit 0."""
    args = pipeline_args(args)
    label = file_label(args)
    for path in config_files(args):  # YAML errors with their line; jsonargparse then reads the file as its config
        read_yaml(path, "pipeline file")
    return _checked(parse(pipeline_parser(), args, f"{label}: "), label)


def read_pipeline(path: str | Path) -> Pipeline:
    """The stages of a pipeline file; a malformed one raises ``DataError`` naming the file and key."""
    return parse_pipeline(["--config", str(path)])


def _checked(parsed: Namespace, label: str) -> Pipeline:
    """What the schema cannot say: at least one stage, unique names, commands that are atspeed stages."""
    if not parsed.stages:
        raise DataError(f"{label}: stages: expected a non-empty list of stages")
    stages: list[Stage] = []
    for i, entry in enumerate(parsed.stages):
        key, run = f"{label}: stages[{i}]", entry.run
        if entry.name in {stage.name for stage in stages}:
            raise DataError(f"{key}.name: expected a unique non-empty name, got {entry.name!r}")
        try:
            argv = shlex.split(run) if isinstance(run, str) else list(run)
        except ValueError as err:  # shlex: "No closing quotation", "No escaped character"
            raise DataError(f"{key}.run: not a command line ({err}): {run}") from None
        if not argv or argv[0] not in STAGES:
            got = repr(argv[0]) if argv else "nothing"
            raise DataError(f"{key}.run: must start with one of {', '.join(STAGES)}, got {got}")
        stages.append(Stage(str(entry.name), [str(word) for word in argv], Path(entry.output)))
    return Pipeline(stages, Path(parsed.summary) if parsed.summary else None)
