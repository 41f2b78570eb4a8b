"""Checks made before any model is built or any output written: each failure is one DataError naming the key."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from atspeed.errors import DataError


def check_output_dir(path: str | Path, key: str) -> None:
    """``path`` is a directory, or can be created as one, and is writable: a file is made there and dropped, since
    ``os.access`` answers yes to root where none can be made (``/proc``, ``/sys``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{key}: {path} exists and is not a directory")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise DataError(f"{key}: cannot create {path}: {existing} is not a directory")
    where = f"{existing}" if existing == path else f"cannot create {path}: {existing}"
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{key}: {where} is not writable")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise DataError(f"{key}: {where} is not writable ({err.strerror})") from None


def weights_only_refusal(err: pickle.UnpicklingError) -> str:
    """What ``torch.load(weights_only=True)`` refused, in one line (its message is a page of advice, ending in how to
    allow the refused global: advice for a file one trusts, not for one that would run code)."""
    refused = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
    return refused.split(". Please use `torch.serialization.add_safe_globals")[0]


def load_weights_only(path: Path, key: str | None, holds: str) -> Any:
    """``torch.load(path, weights_only=True)``, memory-mapped where the file is a zip archive (tensors stay on disk):
    a file whose pickle names anything but tensors, containers and the allowed types (``holds`` says which) is
    refused before any of it is built, in one DataError naming ``key`` and the file."""
    name = f"{key}: {path}" if key else str(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise DataError(f"{name} refused: it holds objects other than {holds} ({weights_only_refusal(err)})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"{name} cannot be read (truncated?): {first}") from None


def check_checkpoint(path: str | Path, key: str) -> None:
    """``path`` is a Lightning checkpoint that loads under ``weights_only=True`` (read lazily, tensors not copied)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}: checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{key}: {path} is empty")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{key}: {path} is not a PyTorch checkpoint (truncated or another format)")
    loaded = load_weights_only(path, key, "tensors and atspeed's config types")
    if not isinstance(loaded, dict) or "state_dict" not in loaded:
        raise DataError(f"{key}: {path} is not a Lightning checkpoint (no state_dict)")


# the pickled weights ``from_pretrained`` may read from a local model directory (one file, or the shards of an index)
PICKLED_WEIGHTS = "pytorch_model*.bin"


def check_model_weights(model_dir: str | Path, key: str | None = None) -> None:
    """Each pickled weight file of Hugging Face model directory ``model_dir`` holds tensors only. transformers reads
    them with ``weights_only=True`` too, but refuses one that would run code with a traceback once the model is being
    built; here it is one line, before anything is built. Safetensors files hold no code and are not opened."""
    for path in sorted(Path(model_dir).glob(PICKLED_WEIGHTS)):
        if path.is_file():
            load_weights_only(path, key, "tensors")


def check_new_file(path: str | Path, key: str, overwrite: bool = False) -> None:
    """``path`` can be written as a new file: not a directory, not an earlier output unless ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{key}: {path} is a directory, not a file path")
    if path.exists() and not overwrite:
        raise DataError(
            f"{key}: {path} exists (an earlier run's output?): give this run another trainer.default_root_dir or "
            "path, or set overwrite: true"
        )
    check_output_dir(path.parent, key)


def check_launch(num_nodes: int, devices, env) -> None:
    """``trainer.num_nodes`` and ``trainer.devices`` agree with the launcher that started this process: torchrun
    (``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE``) or Slurm (``SLURM_NNODES`` / ``SLURM_NTASKS_PER_NODE``), else the
    processes would wait for each other forever or train on a part of the data."""
    if "TORCHELASTIC_RUN_ID" in env and "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:
        per_node, world, launcher = int(env["LOCAL_WORLD_SIZE"]), int(env["WORLD_SIZE"]), "torchrun"
        nodes = world // per_node
    elif "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive") and "SLURM_NNODES" in env:
        per_node_text = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        if not per_node_text.isdigit():
            return
        per_node, nodes, launcher = int(per_node_text), int(env["SLURM_NNODES"]), "Slurm"
    else:
        return
    devices = int(devices) if isinstance(devices, str) and devices.isdigit() else devices
    if isinstance(devices, int) and devices != per_node:
        raise DataError(f"trainer.devices = {devices}, but {launcher} started {per_node} processes per node: set "
                        f"trainer.devices {per_node} (scripts/torchrun.sh and scripts/slurm.sbatch do)")  # fmt: skip
    if num_nodes != nodes:
        raise DataError(f"trainer.num_nodes = {num_nodes}, but {launcher} runs {nodes} nodes: set trainer.num_nodes "
                        f"{nodes} (scripts/torchrun.sh and scripts/slurm.sbatch do)")  # fmt: skip


def check_accelerator(accelerator, deepspeed: bool) -> None:
    """A run that needs a GPU stops here on a machine without one, not later in Lightning's "No supported gpu backend
    found!" (``deepspeed``: the strategy is Lightning's ``DeepSpeedStrategy``, which runs on CUDA GPUs only)."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if deepspeed and not cuda:
        raise DataError("trainer.strategy: DeepSpeed needs a CUDA GPU and this machine has none; run without DeepSpeed "
                        "by leaving out the --config configs/deepspeed/*.yaml (and with --trainer.accelerator cpu if "
                        "another config asks for a GPU)")  # fmt: skip
    found = {"gpu": cuda or mps, "cuda": cuda, "mps": mps}
    if isinstance(accelerator, str) and not found.get(accelerator.lower(), True):
        raise DataError(f"trainer.accelerator: {accelerator!r}, but this machine has no such GPU; set "
                        "--trainer.accelerator cpu (or auto: a GPU where there is one)")  # fmt: skip
