"""``python -m atspeed fit|validate|test|predict --config FILE``: the LightningCLI entry point.

Configs are OmegaConf-flavoured YAML (interpolation allowed), several ``--config`` files merge left to
right, and dotted overrides such as ``--trainer.max_steps 10`` come last. Every run gets a checkpoint
callback (``checkpoint.*``; ``last.ckpt`` every ``checkpoint.every_n_train_steps`` steps, after the final step
and when fit is interrupted), so ``fit ... --ckpt_path last`` resumes from the latest completed step.
Checkpoints load with ``weights_only=True``.

One run per output directory: ``trainer.default_root_dir`` and teacher data are locked right after parsing
(``atspeed.run_lock``), and a second run into one of them stops with one line naming it.

Exit codes: 0 done; 2 bad input (one message naming the key or file, before any model is built; an output directory
in use by another run); 143 stopped
by SIGTERM (what was complete is kept: ``last.ckpt`` in fit, the finished prediction batches in predict);
1 interrupted by Ctrl-C or failed. In fit, SIGTERM and Ctrl-C stop the run at the end of the running step (a second
Ctrl-C at once), where ``last.ckpt`` resumes exactly (``atspeed.callbacks.checkpoint``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

import atspeed.modules.align
import atspeed.modules.recommend
import atspeed.modules.sft
import atspeed.modules.teacher  # noqa: F401
from atspeed.callbacks.checkpoint import SaveLast
from atspeed.callbacks.progress import ProgressLog
from atspeed.callbacks.signals import StopPredictOnSigterm
from atspeed.callbacks.summary import MetricsSummary
from atspeed.data.datamodule import EvalSpec, RecDataModule
from atspeed.data.item_index import SemanticIdSpec
from atspeed.decoding.options import DecodeOptions
from atspeed.deepspeed_config import check_deepspeed_config, needs_cuda, strategy_config
from atspeed.errors import SIGTERM_EXIT, DataError
from atspeed.losses import LossOptions
from atspeed.models.build import LoraSpec, ModelSpec
from atspeed.preflight import check_accelerator, check_checkpoint, check_launch, check_output_dir
from atspeed.run_lock import leads_run, lock_file, locked, sibling_lock_file

# Config dataclasses travel in checkpoint hyper-parameters; allow them through torch.load(weights_only=True).
torch.serialization.add_safe_globals(
    [
        ModelSpec,
        LoraSpec,
        SemanticIdSpec,
        EvalSpec,
        LossOptions,
        DecodeOptions,
        PositiveInt,
        NonNegativeInt,
        PositiveFloat,
    ]
)

MatmulPrecision = Literal["highest", "high", "medium"]

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
}


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
            keys.append("init_args")
        elif line and not line.startswith(_PARSER_NOISE):
            details.append(line.rstrip(":"))
    text = "; ".join(dict.fromkeys(details)) or message.strip().splitlines()[0]
    return f"{'.'.join(keys)}: {text}" if keys else text


class AtspeedParser(LightningArgumentParser):
    """Errors print one line (``error: ...``) and exit 2; the usage text is for ``--help``."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            super().error(message, ex)
        print(f"error: {readable_error(message)}", file=sys.stderr)
        raise SystemExit(2)


class AtspeedCLI(LightningCLI):
    """LightningCLI with atspeed's data module, forced resumable checkpoints and one-line errors."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(SaveLast, "save_last")
        parser.add_lightning_class_args(StopPredictOnSigterm, "sigterm")
        parser.add_lightning_class_args(ProgressLog, "progress")  # log lines when the output is not a terminal
        parser.add_lightning_class_args(MetricsSummary, "summary")  # --summary.path: final metrics as JSON
        parser.add_argument(
            "--matmul_precision", type=MatmulPrecision, default="high",
            help="float32 matrix products on CUDA (torch.set_float32_matmul_precision): high allows TF32",
        )  # fmt: skip
        # stages that load a trained target read its prompt, tokenizer and index from its export: one path, given once
        parser.link_arguments("model", "data.model_dir", compute_fn=target_export, apply_on="parse")
        # one name, one meaning: never last-v1.ckpt
        defaults = {"save_last": True, "every_n_train_steps": 100, "enable_version_counter": False}
        parser.set_defaults({f"checkpoint.{key}": value for key, value in defaults.items()})

    def __init__(self, *args, **kwargs) -> None:
        self.locks = contextlib.ExitStack()  # the run's output directories (run_lock), held until the command ends
        with self.locks:
            super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """Right after parsing (LightningCLI reads the checkpoint's hyper-parameters next): check the run's paths,
        lock its output directories and check the checkpoint, and load checkpoints with ``weights_only=True`` set
        explicitly (Lightning passes None on: torch's default for local files, False for http URLs)."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        try:
            _check_run_config(config)
            self._lock_outputs(config)
            _resolve_ckpt_path(subcommand, config)
        except DataError as err:
            self.parser.error(str(err))
        if subcommand and "weights_only" in config and config.weights_only is None:
            config.weights_only = True
        super()._parse_ckpt_path()

    def _lock_outputs(self, config) -> None:
        """One run per output directory: the run directory and the teacher data directory (``run_lock``)."""
        if leads_run():
            for directory, key, path in output_directories(config):
                self.locks.enter_context(locked(directory, key, path))

    def instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        set_matmul_precision(config.matmul_precision, config.trainer.accelerator)
        try:
            super().instantiate_classes()
        except (DataError, ValueError, TypeError) as err:
            self.parser.error(str(err))


def set_matmul_precision(precision: MatmulPrecision, accelerator) -> bool:
    """Set torch's float32 matmul precision before any model is built, when the run will use CUDA (accelerator
    auto, gpu or cuda on a machine that has it); whether it was set. CPU runs keep torch's default."""
    if not torch.cuda.is_available() or (isinstance(accelerator, str) and accelerator not in ("auto", "gpu", "cuda")):
        return False
    torch.set_float32_matmul_precision(precision)
    return True


def target_export(model) -> str | None:
    """``model.init_args.target`` (the target export of the teacher, alignment and decoding stages), else None."""
    init_args = getattr(model, "init_args", None)
    return getattr(init_args, "target", None)


def _check_run_config(config) -> None:
    """Trainer values and paths that must be right before anything is built or written."""
    trainer = config.trainer
    if trainer.max_steps is not None and trainer.max_steps < -1:
        raise DataError(f"trainer.max_steps must be -1 (no limit) or >= 0, got {trainer.max_steps}")
    root = Path(trainer.default_root_dir or ".")
    check_output_dir(root, "trainer.default_root_dir")
    check_launch(trainer.num_nodes, trainer.devices, os.environ)
    deepspeed = strategy_config(trainer.strategy)
    if deepspeed is not None:
        check_deepspeed_config(deepspeed)
    check_accelerator(trainer.accelerator, needs_cuda(trainer.strategy))
    if config.checkpoint.dirpath is None:
        config.checkpoint.dirpath = str(root / "checkpoints")


def _callbacks(config) -> list:
    callbacks = config.trainer.callbacks
    return [] if callbacks is None else callbacks if isinstance(callbacks, list) else [callbacks]


def output_directories(config) -> list[tuple[Path, str, Path]]:
    """The directories one run writes into, each with its key and lock file: ``trainer.default_root_dir`` and the
    teacher data directory (``TeacherShardWriter.dirpath``, locked beside it: it holds the shards alone)."""
    root = Path(config.trainer.default_root_dir or ".")
    found = [(root, "trainer.default_root_dir", lock_file(root))]
    for callback in _callbacks(config):
        if str(getattr(callback, "class_path", "")).endswith(".TeacherShardWriter"):
            data = Path(callback.init_args.dirpath)
            found.append((data, "TeacherShardWriter.dirpath", sibling_lock_file(data)))
    return found


def _resolve_ckpt_path(subcommand: str | None, config) -> None:
    """``--ckpt_path last`` as the checkpoint file (or None: a fresh fit); a fresh fit must not overwrite a fit's."""
    if subcommand is None or "ckpt_path" not in config:
        return
    last = Path(config.checkpoint.dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    if config.ckpt_path == "last":
        if last.is_file():
            config.ckpt_path = str(last)
        elif subcommand == "fit":
            logging.getLogger("atspeed").info("no %s yet: starting a fresh fit", last)
            config.ckpt_path = None
        else:
            raise DataError(f"--ckpt_path last: no {last} (checkpoint.dirpath)")
    if config.ckpt_path is not None:
        check_checkpoint(config.ckpt_path, "--ckpt_path")
    elif subcommand == "fit" and last.exists():
        raise DataError(
            f"{last} exists from an earlier fit: resume it with --ckpt_path last, or give this run another "
            "trainer.default_root_dir (or checkpoint.dirpath)"
        )


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest and notebooks replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def show_atspeed_logs() -> None:
    """atspeed's own INFO messages (dataset sizes, collisions resolved, exports) go to stderr."""
    logger = logging.getLogger("atspeed")
    if not logger.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("[atspeed] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _config_files(args: list[str]) -> Iterator[Path]:
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            yield Path(args[i + 1])
        elif arg.startswith("--config="):
            yield Path(arg.split("=", 1)[1])


def _check_config_files(args: list[str]) -> None:
    """Each ``--config`` file that exists must be UTF-8 text (jsonargparse would end in a decoding traceback)."""
    for path in _config_files(args):
        if path.is_file():
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"--config {path}: not a text YAML file (byte {err.start} is not UTF-8)") from None


CLI_OPTIONS = {
    "datamodule_class": RecDataModule,
    "subclass_mode_model": True,
    "parser_class": AtspeedParser,
    "parser_kwargs": {"parser_mode": "omegaconf"},
    "save_config_kwargs": {"overwrite": True},
    "trainer_defaults": TRAINER_DEFAULTS,
}


class _ParseOnlyCLI(AtspeedCLI):
    """Parses and checks a command exactly as a run would, then builds and runs nothing."""

    def instantiate_classes(self) -> None:
        pass

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass

    def _set_seed(self) -> None:
        pass

    def _lock_outputs(self, config) -> None:
        pass


def parse_command(args: list[str]):
    """The parsed config of ``python -m atspeed <args>`` (the subcommand's part), built from nothing; a command
    that would stop with bad input raises ``DataError`` with the message the run would print."""
    _check_config_files(args)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            cli = _ParseOnlyCLI(**CLI_OPTIONS, args=args, run=True)
    except SystemExit:
        errors = [line for line in captured.getvalue().splitlines() if line.startswith("error: ")]
        raise DataError(errors[-1].removeprefix("error: ") if errors else captured.getvalue().strip()) from None
    return cli.config[cli.config.subcommand]


def main(args: list[str] | None = None, run: bool = True) -> AtspeedCLI:
    """Run the CLI (``args`` default to ``sys.argv[1:]``): exit 2 on bad input, 143 when stopped by SIGTERM."""
    show_atspeed_logs()
    try:
        _check_config_files(sys.argv[1:] if args is None else args)
        return AtspeedCLI(**CLI_OPTIONS, args=args, run=run)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    except SIGTERMException as err:  # Lightning's SIGTERM exit carries no code: a scheduler would read success
        print("stopped by SIGTERM: what was complete is saved", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT) from err
