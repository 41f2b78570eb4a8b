"""A W&B sweep file (``sweeps/*.yaml``) read for the offline runner: schema, command, parameters, metric.

The file is W&B's own sweep configuration, unchanged: ``wandb sweep FILE`` + ``wandb agent`` run it against the W&B
server; ``python -m atspeed sweep FILE`` runs the same file here. Its ``command`` must run ``python -m atspeed``
(``${interpreter} -m ${program}`` with ``program: atspeed``) and pass the parameters with ``${args}``, which W&B
writes as ``--<parameter>=<value>``: a parameter is a dotted CLI key such as ``model.init_args.alpha``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from atspeed.data.json_file import validated
from atspeed.errors import DataError
from atspeed.yaml_file import read_yaml

# W&B's default command when a sweep file gives none
DEFAULT_COMMAND = ("${env}", "${interpreter}", "${program}", "${args}")
# W&B's macros for the parameters that give atspeed's dotted overrides: ``--key=value`` and ``--key value``
ARGS_MACROS = ("${args}", "${args_no_equals}")
METHODS_NEEDING_COUNT = ("random", "bayes")


def install_hint() -> str:
    return (
        "the offline sweep runner needs W&B's `sweeps` package: pip install -e '.[sweeps]' && "
        "pip install --no-deps 'sweeps==0.3.0' (its numpy<2 pin is not needed for what atspeed uses)"
    )


def _sweeps():
    try:
        with warnings.catch_warnings():  # its pydantic-1 style config names warn under pydantic 2
            warnings.filterwarnings("ignore", module="pydantic")
            import sweeps
    except ImportError as err:
        raise DataError(f"{install_hint()} ({err})") from None
    return sweeps


def plain(value: Any) -> Any:
    """A parameter value as a Python scalar (the search engine returns numpy scalars)."""
    return value.item() if hasattr(value, "item") else value


def format_arg(name: str, value: Any) -> str:
    """``${args}``'s form of one parameter, as W&B's agent writes it."""
    return f"--{name}={plain(value)}"


class Metric(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    goal: Literal["minimize", "maximize"] = "minimize"


class SweepFile(BaseModel):
    """What the offline runner reads of a sweep file (W&B's schema checks the rest; other keys are W&B's)."""

    model_config = ConfigDict(extra="allow")

    method: str
    metric: Metric
    parameters: dict[str, dict[str, Any]]
    command: list[Any] = list(DEFAULT_COMMAND)
    program: str | None = None


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file: ``config`` as written (what W&B's search engine takes), ``spec`` its typed view."""

    path: Path
    config: dict
    spec: SweepFile

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def method(self) -> str:
        return self.spec.method

    @property
    def metric(self) -> str:
        return self.spec.metric.name

    @property
    def goal(self) -> str:
        return self.spec.metric.goal

    @property
    def parameters(self) -> dict[str, dict]:
        return self.spec.parameters

    def argv(self, values: dict[str, Any]) -> list[str]:
        """What follows ``python -m atspeed`` for a run with these parameter values."""
        program = self.spec.program or ""
        words: list[str] = []
        for word in self.spec.command:
            if word == "${args}":
                words += [format_arg(name, value) for name, value in values.items()]
            elif word == "${args_no_equals}":
                words += [part for name, value in values.items() for part in (f"--{name}", str(plain(value)))]
            elif word == "${program}":
                words.append(program)
            elif word != "${env}":
                words.append(str(word))
        return words[_atspeed_position(words, self.path) + 1 :]


def _atspeed_position(words: list[str], path: Path) -> int:
    """Index of ``atspeed`` in ``... -m atspeed ...`` (or the ``atspeed`` console script)."""
    for i, word in enumerate(words):
        if word == "atspeed" and i > 0 and words[i - 1] == "-m":
            return i
        if Path(word).name == "atspeed" and i == 0:
            return i
    raise DataError(
        f"{path}: command: must run `python -m atspeed ...` (e.g. [${{env}}, ${{interpreter}}, -m, ${{program}}, fit, "
        "--config, FILE, ${args}] with program: atspeed)"
    )


def read_sweep(path: str | Path, count: int | None = None) -> Sweep:
    """The sweep file, checked against W&B's sweep schema and atspeed's command form (``DataError`` otherwise)."""
    path = Path(path)
    config = read_yaml(path, "sweep file")
    spec = validated(SweepFile, config, path)
    violations = _sweeps().schema_violations_from_proposed_config(config)
    if violations:
        raise DataError(f"{path}: not a valid W&B sweep configuration: {'; '.join(violations)}")
    command = [str(word) for word in spec.command]
    if bad := [word for word in command if word.startswith("${args") and word not in ARGS_MACROS]:
        raise DataError(f"{path}: command: {bad[0]} is not supported: atspeed takes --key=value overrides (${{args}})")
    if not any(word in ARGS_MACROS for word in command):
        raise DataError(f"{path}: command: needs ${{args}} (where W&B puts --<parameter>=<value>)")
    if "${program}" in command and spec.program is None:
        raise DataError(f"{path}: program: the command uses ${{program}} (set program: atspeed)")
    sweep = Sweep(path, config, spec)
    sweep.argv({})  # the command runs atspeed
    if count is None and sweep.method in METHODS_NEEDING_COUNT:
        raise DataError(f"{path}: method {sweep.method} never ends by itself: give --count (the number of runs)")
    return sweep


def probe_values(sweep: Sweep) -> list[dict[str, Any]]:
    """Parameter values that exercise every value a run can get: every categorical value and both ends of every
    range (W&B's own parameter classes map percentiles 0 and 1 to values), as a full product when it is small,
    else as many runs as the longest list (run i takes each parameter's value i, cyclically)."""
    from sweeps.params import HyperParameter

    choices = {}
    for name, spec in sweep.parameters.items():
        param = HyperParameter(name, spec)
        if param.type in (HyperParameter.CATEGORICAL, HyperParameter.CATEGORICAL_PROB):
            choices[name] = list(spec["values"])
        elif param.type == HyperParameter.CONSTANT:
            choices[name] = [spec["value"]]
        else:
            ends = [plain(param.ppf(x)) for x in (0.0, 1.0)]
            if not all(math.isfinite(v) for v in ends):
                ends = [plain(param.ppf(x)) for x in (0.01, 0.99)]
            choices[name] = ends
    return _combinations(choices)


def _combinations(choices: dict[str, list], limit: int = 64) -> list[dict[str, Any]]:
    total = math.prod(len(values) for values in choices.values())
    if total <= limit:
        runs: list[dict[str, Any]] = [{}]
        for name, values in choices.items():
            runs = [{**run, name: value} for run in runs for value in values]
        return runs
    longest = max(len(values) for values in choices.values())
    return [{name: values[i % len(values)] for name, values in choices.items()} for i in range(longest)]
