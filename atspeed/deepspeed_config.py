"""DeepSpeed through Lightning's own ``DeepSpeedStrategy``: the run's DeepSpeed config, checked before anything starts.

A run uses DeepSpeed when ``trainer.strategy`` names ``DeepSpeedStrategy`` (the files under ``configs/deepspeed/``
add it with one ``--config``). Its ``init_args.config`` (an inline mapping or a JSON file) is validated here, right
after parsing and before any process group or model exists: by DeepSpeed's own ``DeepSpeedConfig`` (which rejects an
unknown ZeRO stage or key inside a section), and for top-level keys that look like a misspelt DeepSpeed key
(``zero_optimisation``). ``gradient_accumulation_steps`` is refused (Lightning sets it from
``trainer.accumulate_grad_batches``). DeepSpeed is an optional extra (``pip install -e '.[deepspeed]'``).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import json
import logging
import pkgutil
from pathlib import Path
from typing import Any

from atspeed.errors import DataError

STRATEGY = "lightning.pytorch.strategies.DeepSpeedStrategy"
_SHORT_NAMES = ("deepspeed", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
                "deepspeed_stage_3", "deepspeed_stage_3_offload")  # fmt: skip
log = logging.getLogger("atspeed")


def _get(node: Any, key: str) -> Any:
    return node.get(key) if isinstance(node, dict) else getattr(node, key, None)


def strategy_config(strategy: Any, key: str = "trainer.strategy") -> dict | None:
    """The DeepSpeed config dict of a parsed ``trainer.strategy`` (None when the strategy is not DeepSpeed)."""
    if isinstance(strategy, str):
        if strategy in _SHORT_NAMES:
            raise DataError(f"{key}: {strategy!r} uses Lightning's defaults; use a file of configs/deepspeed/ (or "
                            f"class_path {STRATEGY} with init_args.config) so that the run's DeepSpeed config is "
                            "explicit and checked")  # fmt: skip
        return None
    class_path = _get(strategy, "class_path")
    if class_path is None or not str(class_path).endswith("DeepSpeedStrategy"):
        return None
    config = _get(_get(strategy, "init_args") or {}, "config")
    if config is None:
        raise DataError(
            f"{key}.init_args.config: DeepSpeedStrategy needs a DeepSpeed config (a mapping or a JSON file)"
        )
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise DataError(f"{key}.init_args.config: DeepSpeed config file not found: {path}")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{key}.init_args.config: {path} is not JSON (line {err.lineno}): {err.msg}") from None
    return _plain(config)


def needs_cuda(strategy: Any) -> bool:
    """Whether a parsed ``trainer.strategy`` is Lightning's own ``DeepSpeedStrategy``, which runs on CUDA GPUs only."""
    class_path = str(_get(strategy, "class_path") or "") if not isinstance(strategy, str) else ""
    return class_path.startswith("lightning.") and class_path.endswith(".DeepSpeedStrategy")


def _plain(node: Any) -> Any:
    """A parsed (namespace / mapping) config as plain dicts and lists."""
    if hasattr(node, "as_dict"):
        node = node.as_dict()
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node


@functools.cache
def _known_keys() -> frozenset[str]:
    """Every lower-case key name DeepSpeed defines in its constants and config modules."""
    import deepspeed

    keys: set[str] = set()
    for module in pkgutil.walk_packages(deepspeed.__path__, "deepspeed."):
        if not module.name.endswith(("constants", ".config")):
            continue
        try:
            loaded = importlib.import_module(module.name)
        except Exception:
            continue
        keys |= {v for k, v in vars(loaded).items() if k.isupper() and isinstance(v, str) and v.isidentifier()}
    return frozenset(k for k in keys if k.islower())


def check_deepspeed_config(config: dict, key: str = "trainer.strategy.init_args.config") -> None:
    """Raise DataError naming ``key`` unless DeepSpeed accepts ``config`` (checked with a micro batch of 1 when the
    config leaves it to Lightning)."""
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError:
        raise DataError(f"{key}: DeepSpeed is not installed: pip install -e '.[deepspeed]'") from None
    if "gradient_accumulation_steps" in config:
        raise DataError(f"{key}.gradient_accumulation_steps: set trainer.accumulate_grad_batches instead (Lightning "
                        "writes it into the DeepSpeed config)")  # fmt: skip
    known = _known_keys()
    for name in config:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
            if close:
                raise DataError(f"{key}.{name}: not a DeepSpeed key; did you mean {close[0]!r}?")
            log.warning("%s.%s: not a key atspeed knows from DeepSpeed; passed on as it is", key, name)
    try:
        DeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, **config})
    except Exception as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip() and "errors.pydantic" not in line]
        raise DataError(f"{key}: DeepSpeed refuses it: {' | '.join(lines[:4])}") from None


def offloads_optimizer(strategy: Any) -> bool:
    """Whether a (constructed) strategy keeps the optimizer state on the CPU (ZeRO-Offload)."""
    config = getattr(strategy, "config", None)
    if not isinstance(config, dict):
        return False
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device") in ("cpu", "nvme")
