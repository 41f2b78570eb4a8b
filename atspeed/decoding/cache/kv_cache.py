"""Every operation on the insides of a Hugging Face ``DynamicCache`` (transformers 5.x) lives here.

The cache holds, per layer, ``keys``/``values`` of shape [B, H, S, D]. Decoding only ever needs:

- ``crop``: drop the last n positions (5.x ``DynamicCache.crop(-n)`` semantics, checked here);
- ``gather_positions``: keep, per row, a chosen list of positions (an accepted tree path, or the union of the
  live beams' paths) and drop everything else, which compacts rejected tree nodes and left padding away;
- ``select_rows``: keep or reorder batch rows (drop finished requests);
- ``layer_states`` / ``cache_holding``: keep a cache's keys and values (the shared prompt header's) and start new
  caches holding them.

Positions are encoded in the keys by RoPE when they are written, so moving a position inside the cache does not
change what it means; the attention mask and ``position_ids`` of later forwards are all that refer to slots.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from atspeed.decoding import constants


def new_cache() -> DynamicCache:
    """An empty cache; layers initialise on the first forward."""
    return DynamicCache()


def cache_length(cache: DynamicCache) -> int:
    """Positions S currently held (0 for an empty cache)."""
    return cache.get_seq_length()


def _layers(cache: DynamicCache) -> list:
    return [layer for layer in cache.layers if getattr(layer, "is_initialized", False) and layer.keys.numel()]


def crop(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions of every row (in place)."""
    current = cache_length(cache)
    if not 0 <= length <= current:
        raise ValueError(f"cannot crop a cache of {current} positions to {length}")
    if length < current:
        cache.crop(length - current)  # 5.x: a negative count removes that many positions
    if cache_length(cache) != length:
        raise RuntimeError("DynamicCache.crop did not remove the expected positions (transformers API change?)")


def gather_positions(cache: DynamicCache, index: torch.Tensor) -> None:
    """Keep positions ``index`` [B, S'] of each row, in that order (in place); S' may be smaller than S."""
    picks: dict[tuple[torch.device, int], tuple[torch.Tensor, ...]] = {}  # per device and head count: made once
    for layer in _layers(cache):
        b, h, _, _ = layer.keys.shape
        key = (layer.keys.device, h)
        if key not in picks:
            device = layer.keys.device
            picks[key] = (constants.column(b, device, 2), constants.column(h, device), index.to(device)[:, None, :])
        layer.keys = layer.keys[picks[key]]  # [B, H, S', D]
        layer.values = layer.values[picks[key]]


def select_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep batch rows ``rows`` [B'] in that order (in place): drop finished requests or reorder beams."""
    for layer in _layers(cache):
        layer.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
        layer.values = layer.values.index_select(0, rows.to(layer.values.device))


def layer_states(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's ``(keys, values)`` [B, H, S, D], in layer order (the tensors themselves, not copies)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_holding(states: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> DynamicCache:
    """A new cache holding ``states`` (``layer_states`` of a one-row cache) in each of ``rows`` rows; the rows share
    the tensors' memory (``expand``) until a later write or gather copies them. The layers are set up directly
    (``DynamicLayer`` initialised with the expanded tensors): ``update`` would copy them once more, four ops per
    layer and request batch (~130 per batch for a 32-layer target)."""
    cache = new_cache()
    for keys, values in states:
        layer = DynamicLayer()
        layer.dtype, layer.device, layer.is_initialized = keys.dtype, keys.device, True
        layer.keys, layer.values = keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1)
        cache.layers.append(layer)
    return cache


def keep_index(needed: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compaction plan for ``needed`` [B, S] (bool): ``(index [B, S'], kept [B, S'])``.

    ``index`` lists each row's needed positions first, in their original order, then filler positions; ``kept``
    marks the real ones. S' = ``width``, the largest number of needed positions in any row (read back from the
    device when not given).
    """
    count = needed.sum(1)  # [B]
    if width is None:
        width = int(count.max()) if needed.numel() else 0
    order = torch.sort(needed.to(torch.int8), dim=1, descending=True, stable=True).indices  # needed first, in order
    index = order[:, :width]
    kept = constants.arange(width, needed.device) < count[:, None]
    return index, kept
