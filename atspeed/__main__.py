"""``python -m atspeed COMMAND ...``: one table from command name to its entry point, each a jsonargparse command.

``fit|validate|test|predict`` (the stages: ``atspeed.cli``), ``pipeline``, ``sweep``, ``export``; each answers
``--help``, ``--print_config`` and ``--config FILE``. Entries are imported by name (``pkgutil.resolve_name``),
so a command loads only what it uses.
"""

from __future__ import annotations

import pkgutil
import sys
from collections.abc import Sequence

# command name -> its entry: a function of the arguments after the name, returning the exit status (None: 0)
COMMANDS = {
    "pipeline": "atspeed.pipeline.main",
    "sweep": "atspeed.sweep.main",
    "export": "atspeed.export_checkpoint.main",
}


def stages(argv: list[str] | None) -> None:
    """``fit|validate|test|predict`` (LightningCLI's own subcommands, so also ``--help`` and no command at all);
    ``argv`` None: ``sys.argv[1:]``, as LightningCLI (and the launchers that rerun it) read it."""
    pkgutil.resolve_name("atspeed.cli.main")(argv)


def main(argv: Sequence[str] | None = None) -> int | None:
    """Run the command ``argv`` (default ``sys.argv[1:]``) names, else the stages' CLI; its exit status."""
    words = sys.argv[1:] if argv is None else list(argv)
    name = words[0] if words else None
    if name not in COMMANDS:
        return stages(None if argv is None else words)
    return pkgutil.resolve_name(COMMANDS[name])(words[1:])


if __name__ == "__main__":
    sys.exit(main())
