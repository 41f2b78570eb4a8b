"""Teacher shards: written whole or not at all, read back per sample, refused when made by another target."""

import json
import re
from pathlib import Path

import pytest
import torch

from atspeed.data import teacher_store
from atspeed.data.teacher_store import (
    MANIFEST,
    SAMPLE_ID,
    TeacherStore,
    existing_shards,
    fingerprint,
    read_shard_info,
    write_manifest,
    write_shard,
)
from atspeed.errors import DataError

SETTINGS = {"beams": 4, "top_k": None, "batch_size": 2}


@pytest.fixture
def target(tmp_path) -> Path:
    export = tmp_path / "target"
    export.mkdir()
    (export / "index.json").write_text(json.dumps({"0": ["<a_0>", "<b_0>"], "1": ["<a_0>", "<b_1>"]}))
    (export / "atspeed.json").write_text(json.dumps({"global_step": 8}))
    return export


def _batch(first: int, count: int, nodes: int) -> dict[str, torch.Tensor]:
    ids = torch.arange(first, first + count)
    return {
        SAMPLE_ID: ids,
        "beams": ids[:, None, None].expand(count, 4, 2).clone(),
        "node_logprobs": torch.randn(count, nodes, 3).half(),  # nodes differ between shards
    }


def test_shards_read_back_per_sample_and_the_manifest_lists_them(tmp_path, target) -> None:
    fp = fingerprint(target, SETTINGS)
    root = tmp_path / "teacher"
    batches = [_batch(0, 3, 5), _batch(3, 2, 7), _batch(5, 4, 6)]
    for number, batch in enumerate(batches):
        write_shard(root, rank=number % 2, number=number, tensors=batch, fp_hash=fp["hash"])
    shards = existing_shards(root, fp)
    assert [s.samples for s in sorted(shards, key=lambda s: s.path.name)] == [3, 4, 2]  # r0-0, r0-2, r1-1
    write_manifest(root, fp, shards)
    store = TeacherStore(root, fp)
    assert len(store) == 9 and store.sample_ids() == list(range(9))
    for batch in batches:
        for row, sample in enumerate(batch[SAMPLE_ID].tolist()):
            got = store[sample]
            for key, tensor in batch.items():
                assert torch.equal(got[key], tensor[row]), (sample, key)
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["samples"] == 9 and manifest["fingerprint"]["hash"] == fp["hash"]
    assert not list(root.glob(".*")), "no temporary file left"


def test_the_fingerprint_follows_the_index_the_export_and_the_settings_not_the_path(tmp_path, target) -> None:
    base = fingerprint(target, SETTINGS)["hash"]
    assert fingerprint(target, {**SETTINGS, "beams": 8})["hash"] != base
    moved = tmp_path / "moved"
    target.rename(moved)
    assert fingerprint(moved, SETTINGS)["hash"] == base
    (moved / "index.json").write_text(json.dumps({"0": ["<a_0>", "<b_1>"], "1": ["<a_0>", "<b_0>"]}))
    assert fingerprint(moved, SETTINGS)["hash"] != base
    (moved / "index.json").write_text(json.dumps({"0": ["<a_0>", "<b_0>"], "1": ["<a_0>", "<b_1>"]}))
    (moved / "atspeed.json").write_text(json.dumps({"global_step": 9}))  # the same target trained further
    assert fingerprint(moved, SETTINGS)["hash"] != base


def test_teacher_data_of_another_target_or_settings_is_refused(tmp_path, target) -> None:
    fp = fingerprint(target, SETTINGS)
    other = fingerprint(target, {**SETTINGS, "beams": 8})
    root = tmp_path / "teacher"
    write_shard(root, 0, 0, _batch(0, 2, 3), other["hash"])
    with pytest.raises(DataError, match=r"shard-r0-00000\.safetensors: teacher data made by another target"):
        existing_shards(root, fp)
    write_manifest(root, other, existing_shards(root, other))
    with pytest.raises(DataError, match=r"manifest\.json: teacher data made by another target.*target "):
        existing_shards(root, fp)


@pytest.mark.parametrize("damage", ["empty", "truncated", "foreign"])
def test_a_damaged_shard_is_named(tmp_path, target, damage) -> None:
    fp = fingerprint(target, SETTINGS)
    root = tmp_path / "teacher"
    path = write_shard(root, 0, 0, _batch(0, 2, 3), fp["hash"])
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-20])
    else:
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(DataError, match=r"shard-r0-00000\.safetensors: not a"):
        read_shard_info(path)


def test_an_interrupted_write_leaves_nothing(tmp_path, target, monkeypatch) -> None:
    def fail(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(teacher_store, "save_file", fail)
    root = tmp_path / "teacher"
    with pytest.raises(KeyboardInterrupt):
        write_shard(root, 0, 0, _batch(0, 2, 3), "abc")
    assert list(root.iterdir()) == []


def test_the_store_needs_a_complete_run(tmp_path, target) -> None:
    fp = fingerprint(target, SETTINGS)
    root = tmp_path / "teacher"
    write_shard(root, 0, 0, _batch(0, 2, 3), fp["hash"])
    with pytest.raises(DataError, match="no teacher manifest"):
        TeacherStore(root, fp)
    write_manifest(root, fp, existing_shards(root, fp))
    (root / "shard-r0-00000.safetensors").unlink()
    with pytest.raises(DataError, match="lists shards that are missing"):
        TeacherStore(root, fp)


def test_batches_of_different_node_counts_stack_with_nothing_in_the_padding() -> None:
    a, b = torch.randn(2, 3, 4).half(), torch.randn(1, 5, 4).half()
    stacked = teacher_store.stack_padded([a, b])
    assert stacked.shape == (3, 5, 4) and torch.equal(stacked[:2, :3], a) and torch.equal(stacked[2:], b)
    assert torch.isneginf(stacked[:2, 3:]).all(), "padded nodes have no probability mass"
    ids = teacher_store.stack_padded([torch.ones(1, 2, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)])
    assert ids.tolist() == [[1, 1, 0], [1, 1, 1]]


def _complete(root: Path, fp: dict) -> Path:
    """Two shards and their manifest; the path of the first shard."""
    first = write_shard(root, 0, 0, _batch(0, 2, 3), fp["hash"])
    write_shard(root, 0, 1, _batch(2, 2, 4), fp["hash"])
    write_manifest(root, fp, existing_shards(root, fp))
    return first


def test_the_manifest_records_each_shards_sha256_and_an_edited_shard_is_refused(tmp_path, target) -> None:
    """One tensor edited, the file's metadata (format, fingerprint, samples) kept: the shard still reads as a teacher
    shard of this target, but its sha256 is not the manifest's, and the store names it."""
    fp = fingerprint(target, SETTINGS)
    root = tmp_path / "teacher"
    first = _complete(root, fp)
    entries = json.loads((root / MANIFEST).read_text())["shards"]
    assert all(len(e["sha256"]) == 64 for e in entries) and entries[0]["sha256"] != entries[1]["sha256"]
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(first), framework="pt") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    tensors["node_logprobs"][0, 0, 0] += 1.0
    save_file(tensors, str(first), metadata=meta)
    assert read_shard_info(first).samples == 2, "still a valid teacher shard of this target"
    with pytest.raises(DataError, match=r"shard-r0-00000\.safetensors: its sha256 differs from the one manifest\.json"):
        TeacherStore(root, fp)


def test_each_shard_is_hashed_once_per_process_not_per_sample(tmp_path, target, monkeypatch) -> None:
    fp = fingerprint(target, SETTINGS)
    root = tmp_path / "teacher"
    _complete(root, fp)
    hashed: list[str] = []
    real = teacher_store._sha256
    monkeypatch.setattr(teacher_store, "_sha256", lambda path: hashed.append(path.name) or real(path))
    store = TeacherStore(root, fp)
    assert sorted(hashed) == ["shard-r0-00000.safetensors", "shard-r0-00001.safetensors"]
    [store[i] for i in range(4)]
    TeacherStore(root, fp)  # a second store in the same process (e.g. fit, then validate)
    assert len(hashed) == 2


def test_a_manifest_without_hashes_is_refused(tmp_path, target) -> None:
    fp = fingerprint(target, SETTINGS)
    root = tmp_path / "teacher"
    _complete(root, fp)
    body = json.loads((root / MANIFEST).read_text())
    for entry in body["shards"]:
        del entry["sha256"]
    (root / MANIFEST).write_text(json.dumps(body))
    with pytest.raises(DataError, match=r"manifest\.json: no sha256 for its shards .*regenerate the teacher data"):
        TeacherStore(root, fp)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"shards": "shard-r0-00000.safetensors"}, "shards"),
        (
            {"shards": [{"file": "shard-r0-00000.safetensors", "rank": "0", "samples": 2, "sha256": "ab"}]},
            "shards[0].rank",
        ),
        ({"fingerprint": {"settings": {}}}, "fingerprint.hash"),
        ({"samples": None}, "samples"),
    ],
)
def test_a_malformed_manifest_names_the_file_and_key(tmp_path, target, change, key) -> None:
    """Not reported as teacher data of another target, nor as a manifest written before the hashes."""
    fp = fingerprint(target, SETTINGS)
    root = tmp_path / "teacher"
    _complete(root, fp)
    (root / MANIFEST).write_text(json.dumps(json.loads((root / MANIFEST).read_text()) | change))
    with pytest.raises(DataError, match=rf"manifest\.json: {re.escape(key)}: ") as err:
        TeacherStore(root, fp)
    assert "\n" not in str(err.value)


def test_stored_float16_rows_stack_inside_a_bf16_mixed_step_on_the_cpu() -> None:
    """Alignment reads the float16 distributions inside the training step, which bf16-mixed runs under autocast."""
    rows = [torch.zeros(1, 2, 3, dtype=torch.float16), torch.zeros(1, 1, 3, dtype=torch.float16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stacked = teacher_store.stack_padded(rows)
    assert stacked.dtype == torch.float16 and stacked.shape == (2, 2, 3) and torch.isinf(stacked[1, 1]).all()
