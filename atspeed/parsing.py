"""The parsing every atspeed command shares (the stages' LightningCLI, ``pipeline``, ``sweep``, ``export``):
jsonargparse parsers whose errors are one line ``error: <key>: <what is wrong>`` and exit 2, and the checks of
``--config`` files that jsonargparse would end in a traceback. Light on imports: no torch, no Lightning."""

from __future__ import annotations

import dataclasses
import pkgutil
import re
import sys
from argparse import ArgumentError
from collections.abc import Iterator, Sequence
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from atspeed.errors import DataError

STAGES = ("fit", "validate", "test", "predict")  # the LightningCLI's subcommands: what a pipeline stage or sweep runs

# jsonargparse's lines that explain its own search (through Union types and class paths), not the user's mistake
_PARSER_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Expected a <class 'NoneType'>",
    "Given value type:",
    "Given value: Namespace(",
    "Given value: NestedArg(",
)


def readable_error(message: str) -> str:
    """jsonargparse's nested error report as one line: ``<dotted key>: <what is wrong>``."""
    keys, details = [], []
    for line in (raw.strip() for raw in message.strip().splitlines()):
        line = line.removeprefix("- ")
        if key := re.fullmatch(r'Parser key "([^"]+)":', line):
            keys.append(key.group(1))
        elif line.startswith("Problem with given class_path"):
            path = re.search(r"'([^']+)'", line)  # a dataclass's keys are its own, not under init_args
            keys += [] if path and _is_dataclass(path.group(1)) else ["init_args"]
        elif line and not line.startswith(_PARSER_NOISE):
            details.append(line.rstrip(":"))
    text = "; ".join(dict.fromkeys(details)) or message.strip().splitlines()[0]
    return f"{'.'.join(keys)}: {text}" if keys else text


def _is_dataclass(class_path: str) -> bool:
    try:
        return dataclasses.is_dataclass(pkgutil.resolve_name(class_path))
    except (ImportError, AttributeError, ValueError):
        return False


def config_files(args: Sequence[str]) -> Iterator[Path]:
    """The files given with ``--config FILE``, ``--config=FILE`` or ``-c FILE``, in order."""
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            yield Path(args[i + 1])
        elif arg.startswith("--config="):
            yield Path(arg.split("=", 1)[1])


def check_config_files(args: Sequence[str]) -> None:
    """Each ``--config`` file that exists must be UTF-8 text (jsonargparse would end in a decoding traceback)."""
    for path in config_files(args):
        if path.is_file():
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"--config {path}: not a text YAML file (byte {err.start} is not UTF-8)") from None


def command_parser(prog: str, description: str) -> ArgumentParser:
    """A command's parser: ``--config FILE`` (and with it ``--print_config``); errors raised, not printed, for
    ``parse`` to turn into one line."""
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of the options below")
    return parser


def parse(parser: ArgumentParser, args: Sequence[str], where: str = "") -> Namespace:
    """``args`` parsed by a ``command_parser``; bad input raises ``DataError`` (``where`` + the key and what is
    wrong). ``--help`` and ``--print_config`` print and exit 0 as usual."""
    check_config_files(args)
    try:
        return parser.parse_args(list(args))
    except ArgumentError as err:
        raise DataError(f"{where}{readable_error(str(err))}") from None


def fail(err: DataError) -> SystemExit:
    """Print the one line of bad input; the exit to raise (status 2)."""
    print(f"error: {err}", file=sys.stderr)
    return SystemExit(2)
