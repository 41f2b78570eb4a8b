"""``python -m atspeed export CKPT --out DIR [--single-file FILE]``: a fit's checkpoint as a Hugging Face export.

CKPT is a checkpoint of ``python -m atspeed fit``: the directory DeepSpeed writes (Lightning's DeepSpeed
``last.ckpt``: ZeRO partitions, one set per rank) or a single-file Lightning checkpoint. A ZeRO directory is first
consolidated by Lightning's own ``convert_zero_checkpoint_to_fp32_state_dict`` into one fp32 checkpoint: kept as FILE
with ``--single-file`` (a checkpoint without DeepSpeed, for ``--ckpt_path`` or ``load_from_checkpoint``), else written
to a temporary file beside DIR and removed. The run's LightningModule and data module are then rebuilt from the
checkpoint's hyper-parameters (the data files and, for alignment, the target export must still be where the fit read
them), the weights loaded, and DIR written exactly as ``ExportHuggingFace`` writes it when fit ends: ``save_pretrained``
weights and config, the tokenizer, ``index.json`` and ``atspeed.json`` (``global_step`` the checkpoint's). The weights
are those the optimizer held: fp32 from ZeRO (a bf16 fit's own export holds their bf16 copies).

    python -m atspeed export runs/beauty/target/checkpoints/last.ckpt --out runs/beauty/target/hf_last
    python -m atspeed export runs/beauty/target/checkpoints/last.ckpt --out runs/beauty/target/hf_last \\
        --single-file runs/beauty/target/last_fp32.ckpt

The options are ``export_checkpoint``'s typed signature, parsed by jsonargparse like every command (``--help``,
``--print_config``, ``--config FILE``; ``--single-file`` and ``--single_file`` alike).

Every file of CKPT loads with ``weights_only=True``: tensors, plain containers, atspeed's config types and, in a ZeRO
directory, the three DeepSpeed types of ``zero_safe_globals``; a file holding anything else (a pickle that would run
code) is refused before anything of it is built, and the conversion itself runs with weights-only loading forced.
DIR and FILE appear whole or not at all. DIR may replace only an earlier atspeed export; FILE must not exist. One
export into DIR at a time: a lock file ``.<DIR name>.atspeed.lock`` beside DIR (``atspeed.run_lock``).
Exit codes: 0 written; 2 bad input (one line ``error: ...`` naming the path, before any model is built): CKPT
missing, refused or not a checkpoint of an atspeed fit, DIR present but not written by atspeed or not writable, DIR
being written by another export, FILE present; 1 failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import pkgutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from jsonargparse import ArgumentParser

from atspeed.atomic import atomic_file, check_replaceable
from atspeed.callbacks.export import plain_model, write_export
from atspeed.data.datamodule import RecDataModule
from atspeed.data.sources import upgrade_data_hparams
from atspeed.errors import DataError
from atspeed.parsing import command_parser, fail, parse
from atspeed.preflight import check_checkpoint, load_weights_only, weights_only_refusal
from atspeed.run_lock import locked, sibling_lock_file

log = logging.getLogger("atspeed")
ZERO_LATEST = "latest"  # DeepSpeed's file naming the tag directory of the newest save
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch: every torch.load with weights_only=True


def check_inputs(ckpt: Path, out: Path, single_file: Path | None) -> None:
    """Every path is usable before anything is read in full or built (DataError naming the path); the paths first,
    then what CKPT holds (every file a weights-only load, nothing unpickled that could run code)."""
    if not ckpt.exists():
        raise DataError(f"CKPT: checkpoint not found: {ckpt}")
    if single_file is not None and not ckpt.is_dir():
        raise DataError(f"--single-file: {ckpt} is already a single-file checkpoint; export it without the option")
    if single_file is not None and (single_file.exists() or single_file.is_symlink()):
        raise DataError(f"--single-file: {single_file} exists; refusing to replace it")
    if single_file is not None and single_file.absolute() == out.absolute():
        raise DataError(f"--single-file: {single_file} is also --out; give the file and the directory two paths")
    check_replaceable(out, "--out")
    if ckpt.is_dir():
        check_zero_directory(ckpt)
    else:
        check_checkpoint(ckpt, "CKPT")


def zero_safe_globals() -> list[type]:
    """The DeepSpeed types a ZeRO-2/3 checkpoint holds beside tensors and plain containers, all in the optimizer
    states (the model states hold only atspeed's config types, allowed by ``atspeed.cli``): seen in real checkpoints
    of configs/deepspeed/zero{2,3}.json, bf16 and fp32. fp16's DynamicLossScaler is not among them."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        raise DataError("CKPT: a DeepSpeed checkpoint: consolidating it needs DeepSpeed (pip install "
                        "'atspeed[deepspeed]')") from None  # fmt: skip
    return [LossScaler, ZeroStageEnum, fragment_address]


def check_zero_directory(path: Path) -> None:
    """``path`` holds a DeepSpeed checkpoint: a ``latest`` file naming a tag directory of model-state and
    optimizer-state files, each of which loads with ``weights_only=True`` (``zero_safe_globals`` allowed)."""
    latest = path / ZERO_LATEST
    if not latest.is_file():
        raise DataError(f"CKPT: {path} is a directory but not a DeepSpeed checkpoint (no {ZERO_LATEST} file)")
    tag = path / latest.read_text(encoding="utf-8", errors="replace").strip()
    if not tag.is_dir() or not any(tag.glob("*model_states.pt")):
        raise DataError(f"CKPT: {path}: {latest.name} names {tag.name}, which holds no DeepSpeed model states")
    if not any(tag.glob("*_optim_states.pt")):
        raise DataError(f"CKPT: {path}: {tag.name} holds no optimizer states (*_optim_states.pt), where ZeRO keeps "
                        "the fp32 weights: saved without them, it cannot be exported")  # fmt: skip
    with torch.serialization.safe_globals(zero_safe_globals()):
        for file in sorted(tag.glob("*_states.pt")):
            load_weights_only(file, "CKPT", "tensors and the DeepSpeed and atspeed types of a ZeRO checkpoint")


@contextlib.contextmanager
def forced_weights_only(allowed: list[type]) -> Iterator[None]:
    """Every ``torch.load`` inside loads with ``weights_only=True``, allowing ``allowed`` beside tensors: torch's
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides the ``weights_only=False`` that Lightning's and DeepSpeed's ZeRO
    converters pass (the files are checked before; this holds should one change in between)."""
    saved = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if saved is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = saved


def consolidate(ckpt: Path, single_file: Path) -> None:
    """One fp32 Lightning checkpoint from a ZeRO directory, written atomically to ``single_file``; every file read
    with ``weights_only=True``."""
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with atomic_file(single_file) as tmp, forced_weights_only(zero_safe_globals()):
        try:
            convert_zero_checkpoint_to_fp32_state_dict(ckpt, tmp)
        except pickle.UnpicklingError as err:
            raise DataError(f"CKPT: {ckpt} refused: a file holds objects other than tensors and the types of a ZeRO "
                            f"checkpoint ({weights_only_refusal(err)})") from None  # fmt: skip
        except (ValueError, KeyError, FileNotFoundError) as err:  # DeepSpeed's checks of the partitions
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"CKPT: {ckpt}: DeepSpeed cannot consolidate it: {text}") from None
    log.info("consolidated %s into %s", ckpt, single_file)


def load_checkpoint(path: Path, name: Path) -> dict[str, Any]:
    """A single-file checkpoint of an atspeed fit, loaded with ``weights_only=True`` (``name``: what the user gave)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise DataError(
            f"CKPT: {name} refused: it holds objects other than tensors and atspeed's types "
            f"({weights_only_refusal(err)})"
        ) from None
    ours = isinstance(checkpoint, dict) and isinstance(checkpoint.get("datamodule_hyper_parameters"), dict)
    hparams = checkpoint.get("hyper_parameters") if ours else None
    if not isinstance(hparams, dict) or "_class_path" not in hparams or "state_dict" not in checkpoint:
        raise DataError(f"CKPT: {name} lacks the module class, data hyper-parameters or weights of a checkpoint of "
                        "`python -m atspeed fit`")  # fmt: skip
    return checkpoint


def build_datamodule(checkpoint: dict[str, Any], name: Path) -> RecDataModule:
    """The fit's data module, from the checkpoint's hyper-parameters, set up (tokenizer, item index)."""
    hparams = {k: v for k, v in checkpoint["datamodule_hyper_parameters"].items() if k != "_instantiator"}
    try:
        hparams = upgrade_data_hparams(hparams)  # a checkpoint from before typed sources
    except DataError as err:
        raise DataError(f"CKPT: {name}: its data source: {err}") from None
    try:
        dm = RecDataModule(**hparams)
    except TypeError as err:
        raise DataError(f"CKPT: {name}: its data hyper-parameters do not fit this atspeed version: {err}") from None
    dm.prepare_data()
    dm.setup("fit")
    return dm


def module_class(class_path: str, name: Path) -> type[pl.LightningModule]:
    """The LightningModule class the checkpoint names; only atspeed's own modules are imported."""
    cls = None
    if class_path.startswith("atspeed."):
        try:
            cls = pkgutil.resolve_name(class_path)
        except (ImportError, AttributeError, ValueError):
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule) and hasattr(cls, "export_model")):
        raise DataError(f"CKPT: {name} names {class_path!r}, not an atspeed training module with export_model")
    return cls


def build_module(checkpoint: dict[str, Any], dm: RecDataModule, name: Path) -> pl.LightningModule:
    """The fit's LightningModule rebuilt from the checkpoint's hyper-parameters, its model built and loaded."""
    from lightning.pytorch.cli import instantiate_module

    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k != "_instantiator"}
    module = instantiate_module(module_class(hparams["_class_path"], name), hparams)
    # the modules read the data module through their trainer, as in fit
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.datamodule = dm
    module.trainer = trainer
    module.configure_model()
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise DataError(f"CKPT: {name}: its weights do not fit the module its hyper-parameters describe: "
                        f"{str(err).splitlines()[0]}") from None  # fmt: skip
    return module


def export_checkpoint(ckpt: str, *, out: str, single_file: str | None = None) -> None:
    """A fit's checkpoint as a Hugging Face export (the module docstring says how).

    Args:
        ckpt: a fit's checkpoint: a DeepSpeed ZeRO directory or a single file.
        out: the Hugging Face export directory to write.
        single_file: also keep the consolidated fp32 checkpoint of a ZeRO directory here (a new file).
    """
    ckpt, out = Path(ckpt), Path(out)
    single_file = Path(single_file) if single_file is not None else None
    check_inputs(ckpt, out, single_file)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.absolute().parent, prefix=f".{out.name}.consolidating.") as scratch:
        path = ckpt
        if ckpt.is_dir():
            path = single_file or Path(scratch) / "checkpoint.ckpt"
            consolidate(ckpt, path)
        checkpoint = load_checkpoint(path, ckpt)
        dm = build_datamodule(checkpoint, ckpt)
        module = build_module(checkpoint, dm, ckpt)
        write_export(out, plain_model(module.export_model()), dm, int(checkpoint.get("global_step", 0)), key="--out")


def _parser() -> ArgumentParser:
    """The command's options: ``export_checkpoint``'s signature (``--single-file`` also spelled as before)."""
    parser = command_parser("python -m atspeed export", __doc__.split("\n\n")[0])
    parser.add_function_arguments(export_checkpoint, as_positional=True, skip={"single_file"})
    keep = "also keep the consolidated fp32 checkpoint of a ZeRO directory here (a new file)"
    parser.add_argument("--single_file", "--single-file", type=str | None, default=None, metavar="FILE", help=keep)
    return parser


def main(args: list[str]) -> None:
    """``python -m atspeed export``: exit 2 with one ``error: ...`` line on bad input."""
    import atspeed.cli  # registers the config types checkpoints hold as safe for weights_only loading

    atspeed.cli.show_atspeed_logs()
    try:
        parsed = parse(_parser(), args)
        with locked(parsed.out, "--out", sibling_lock_file(parsed.out)):  # one export into DIR at a time
            export_checkpoint(parsed.ckpt, out=parsed.out, single_file=parsed.single_file)
    except DataError as err:
        raise fail(err) from None
