"""Semantic item identifiers by residual k-means over item content embeddings.

Level 1 clusters the embeddings into ``codebook_size`` centroids; each later level clusters the
residuals (embedding minus the centroids chosen so far). An item's identifier is its L centroid
indices, written as tokens ``<a_i> <b_j> <c_k> ...``. Items that land on the same L codes are then
separated at the last level (:func:`resolve_collisions`), so every identifier names one item.
Clustering is faiss k-means (``faiss.Kmeans``), seeded per level.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import faiss
import numpy as np
import torch


@dataclass(frozen=True)
class SemanticCodes:
    """Residual k-means output, before collision resolution."""

    codes: torch.Tensor
    """[I, L] int64: per item, the centroid index chosen at each level."""
    last_distances: torch.Tensor
    """[I, K] float32: squared L2 distance of each item's last-level residual to each last-level centroid."""

    def __post_init__(self) -> None:
        if self.codes.dim() != 2 or self.codes.dtype != torch.long:
            raise ValueError(f"codes must be an int64 [I, L] tensor, got {self.codes.dtype} {tuple(self.codes.shape)}")
        if self.last_distances.dim() != 2 or self.last_distances.shape[0] != self.codes.shape[0]:
            raise ValueError(
                f"last_distances must be [I, K] with I = {self.codes.shape[0]}, got {tuple(self.last_distances.shape)}"
            )


def _check_args(embeddings: torch.Tensor, levels: int, codebook_size: int, niter: int) -> None:
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if codebook_size < 2:
        raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")
    if embeddings.dim() != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise ValueError(f"embeddings must be a non-empty [I, D] tensor, got shape {tuple(embeddings.shape)}")
    if not torch.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or infinite values")


def _fit_level(points: np.ndarray, k: int, seed: int, niter: int) -> faiss.Kmeans:
    """One faiss k-means on ``points`` [I, D] (float32, C-contiguous)."""
    kmeans = faiss.Kmeans(
        points.shape[1], k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1, spherical=False
    )
    kmeans.train(points)
    return kmeans


def residual_kmeans(
    embeddings: torch.Tensor,
    levels: int = 4,
    codebook_size: int = 256,
    seed: int = 0,
    niter: int = 20,
    normalize: bool = True,
) -> SemanticCodes:
    """Quantise ``embeddings`` [I, D] into ``levels`` codes per item by residual k-means.

    ``normalize`` clusters the *direction* of each residual (spherical k-means) and subtracts the
    centroid scaled by the residual's length. Plain residual k-means lets a few large residuals claim
    their own centroids while everything else falls into one cell (seen on MovieLens-100k titles: 1,630
    of 1,682 items shared one level-3 code); normalising keeps the levels balanced.

    ``codebook_size`` is clamped to the number of distinct embeddings (k-means cannot place more
    centroids than points), so ``last_distances`` is [I, min(codebook_size, distinct)]. Level l is
    seeded with ``seed + l``; the result is deterministic for a given seed.
    """
    _check_args(embeddings, levels, codebook_size, niter)
    residual = np.ascontiguousarray(embeddings.detach().to("cpu", torch.float32).numpy())
    k = min(codebook_size, np.unique(residual, axis=0).shape[0])
    codes = np.empty((residual.shape[0], levels), dtype=np.int64)
    for level in range(levels):
        scale = np.linalg.norm(residual, axis=1, keepdims=True) if normalize else np.ones((len(residual), 1))
        points = np.ascontiguousarray(residual / np.maximum(scale, 1e-12), dtype=np.float32)
        kmeans = _fit_level(points, k, seed + level, niter)
        search_k = k if level == levels - 1 else 1
        distances, assigned = kmeans.index.search(points, search_k)  # [I, search_k], sorted by distance
        codes[:, level] = assigned[:, 0]
        if level == levels - 1:
            last = np.empty_like(distances)
            np.put_along_axis(last, assigned, distances, axis=1)  # back to centroid order
        residual = np.ascontiguousarray(residual - scale * kmeans.centroids[assigned[:, 0]], dtype=np.float32)
    return SemanticCodes(codes=torch.from_numpy(codes), last_distances=torch.from_numpy(last))


def _collision_groups(codes: torch.Tensor) -> list[list[int]]:
    """Rows of ``codes`` [I, L] sharing a full code, one list per shared code, ordered by lowest row."""
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    shared = counts[inverse] > 1  # [I]
    groups: dict[int, list[int]] = {}
    for row, group in zip(shared.nonzero().flatten().tolist(), inverse[shared].tolist(), strict=True):
        groups.setdefault(group, []).append(row)
    return sorted(groups.values(), key=lambda rows: rows[0])


def resolve_collisions(sc: SemanticCodes, max_codes: int = 256) -> tuple[torch.Tensor, int]:
    """Make every row of ``sc.codes`` distinct by moving colliding items at the last level.

    In each group of items with the same full code, the item nearest its last-level centroid keeps the
    code (ties: lowest row); the others, nearest first, each take the nearest last-level code (by
    ``last_distances``) not yet used under their (L-1)-prefix. When every trained code under that prefix
    is taken (near-identical items pile into one cell), the lowest free overflow code in
    [codebook size, ``max_codes``) is used: a token with no centroid, whose embedding the model learns.
    Returns the new codes [I, L] and the number of items moved. Raises ValueError if no code is left.
    """
    codes = sc.codes.clone()
    num_codes = sc.last_distances.shape[1]
    groups = _collision_groups(codes)
    if not groups:
        return codes, 0
    used: dict[tuple[int, ...], set[int]] = {}
    for row in codes.tolist():
        used.setdefault(tuple(row[:-1]), set()).add(row[-1])
    moved = 0
    for group in groups:
        own = sc.last_distances[group, codes[group, -1]].tolist()
        order = sorted(range(len(group)), key=lambda i: (own[i], group[i]))
        prefix = tuple(codes[group[0], :-1].tolist())
        for row in (group[i] for i in order[1:]):
            preference = torch.argsort(sc.last_distances[row], stable=True).tolist()
            preference += range(num_codes, max(max_codes, num_codes))
            free = next((c for c in preference if c not in used[prefix]), None)
            if free is None:
                raise ValueError(
                    f"cannot give item {row} a distinct identifier: all {num_codes} last-level codes under prefix "
                    f"{list(prefix)} (and overflow codes up to {max_codes}) are taken; use more levels"
                )
            used[prefix].add(free)
            codes[row, -1] = free
            moved += 1
    return codes, moved


def level_family(level: int) -> str:
    """Token family of a level: 0 -> "a", 25 -> "z", 26 -> "aa", 27 -> "ab", ..."""
    letters = string.ascii_lowercase
    family = ""
    level += 1
    while level > 0:
        level, rest = divmod(level - 1, 26)
        family = letters[rest] + family
    return family


def codes_to_tokens(codes: torch.Tensor) -> list[tuple[str, ...]]:
    """Write ``codes`` [I, L] as token tuples, ``[[12, 3]] -> [("<a_12>", "<b_3>")]``."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be [I, L], got shape {tuple(codes.shape)}")
    families = [level_family(level) for level in range(codes.shape[1])]
    return [tuple(f"<{family}_{code}>" for family, code in zip(families, row, strict=True)) for row in codes.tolist()]
