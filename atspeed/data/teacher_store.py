"""Teacher data on disk: safetensors shards of per-sample tensors, written atomically, with a manifest.

A teacher run writes, per process (rank), shards ``shard-r<rank>-<n>.safetensors``: tensors whose first dimension is
the sample (``sample_id`` [S] among them), and in the file's metadata the run's ``fingerprint`` (the target export's
identity and the settings). A shard appears whole or not at all (temporary file + ``os.replace``), so after an
interruption the complete shards are exactly the ones present, and a resumed run skips their samples. When every
rank is done, ``manifest.json`` lists the shards with each one's sha256. Data made by another target, index or
settings is refused with one message naming the file, before any work; so is a shard whose bytes no longer match the
manifest's sha256 (checked once per shard per process, when ``TeacherStore`` first opens it), and a manifest without
hashes (written before they were recorded: regenerate the teacher data; an unverifiable shard is refused rather than
trained on with a warning, since an edited tensor changes the trained draft and nothing else would show it).

Tensors other than ``sample_id`` may differ in their later dimensions from shard to shard (e.g. the number of tree
nodes); ``TeacherStore`` hands out one sample at a time and leaves padding to the collate function. Which tensors a
shard holds depends on the settings (teacher data made without distributions has no ``node_logprobs``):
``TeacherStore.keys`` says what every sample has.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, NonNegativeInt
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from atspeed.atomic import atomic_file, write_text_atomic
from atspeed.data.export_dir import INDEX_FILE, META_FILE
from atspeed.data.json_file import read_json, validated
from atspeed.errors import DataError

FORMAT = "atspeed-teacher-1"
MANIFEST = "manifest.json"
SAMPLE_ID = "sample_id"


def stack_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, padding later dims to the largest: -inf for floats (log-probabilities of nodes that
    do not exist), 0 otherwise."""
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    padded = []
    for part in parts:
        pad = [amount for d in reversed(range(1, part.dim())) for amount in (0, shape[d - 1] - part.shape[d])]
        fill = float("-inf") if part.is_floating_point() else 0
        padded.append(torch.nn.functional.pad(part, pad, value=fill) if any(pad) else part)
    with torch.autocast("cpu", enabled=False):  # a bf16-mixed step on the CPU refuses to cat the stored float16
        return torch.cat(padded)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):  # 16 MiB at a time: shards can be gigabytes
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(target_dir: str | Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """What makes teacher data valid for a run: the target export (its identifier index and export metadata, which
    records the training step) and the teacher settings; ``hash`` summarises them."""
    target = Path(target_dir)
    identity = {
        "format": FORMAT,
        "target": str(target.resolve()),
        "index_sha256": _sha256(target / INDEX_FILE),
        "export_sha256": _sha256(target / META_FILE),
        "settings": dict(sorted(settings.items())),
    }
    digest = hashlib.sha256(json.dumps({k: v for k, v in identity.items() if k != "target"}, sort_keys=True).encode())
    return {**identity, "hash": digest.hexdigest()[:16]}


@dataclass(frozen=True)
class ShardInfo:
    """One complete shard: its file, the process that wrote it and its samples."""

    path: Path
    rank: int
    samples: int
    fingerprint_hash: str


def shard_path(root: Path, rank: int, number: int) -> Path:
    return root / f"shard-r{rank}-{number:05d}.safetensors"


def read_shard_info(path: Path) -> ShardInfo:
    """The metadata of a shard; DataError naming the file when it is empty, truncated or not a teacher shard."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            keys = set(handle.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable teacher shard (truncated or empty?): {err}") from None
    if meta.get("format") != FORMAT or SAMPLE_ID not in keys or "fingerprint" not in meta:
        raise DataError(f"{path}: not an atspeed teacher shard (format {meta.get('format')!r})")
    return ShardInfo(path, int(meta["rank"]), int(meta["samples"]), meta["fingerprint"])


class ManifestShard(BaseModel):
    model_config = ConfigDict(strict=True)

    file: str
    rank: NonNegativeInt
    samples: NonNegativeInt
    sha256: str | None = None
    """None: written before atspeed recorded the hashes."""


class ManifestFingerprint(BaseModel):
    """``fingerprint``'s result as the manifest stores it (its other keys are kept as they are)."""

    model_config = ConfigDict(strict=True, extra="allow")

    hash: str
    settings: dict[str, Any]


class TeacherManifest(BaseModel):
    """``manifest.json``: written by ``write_manifest``, read by ``read_manifest``."""

    model_config = ConfigDict(strict=True)

    fingerprint: ManifestFingerprint
    samples: NonNegativeInt
    shards: list[ManifestShard]


def read_manifest(path: Path) -> TeacherManifest:
    """The manifest at ``path``; DataError naming the file and key when it is not one."""
    return validated(TeacherManifest, read_json(path, "teacher manifest"), path)


def existing_shards(root: str | Path, expected: Mapping[str, Any]) -> list[ShardInfo]:
    """The complete shards under ``root``, after checking they (and any manifest) match ``expected`` (a
    ``fingerprint``): teacher data of another target, index or settings is refused, never mixed or overwritten."""
    root = Path(root)
    manifest = root / MANIFEST
    if manifest.exists():
        found = read_manifest(manifest).fingerprint
        if found.hash != expected["hash"]:
            raise DataError(_mismatch(manifest, found.model_dump()))
    shards = [read_shard_info(path) for path in sorted(root.glob("shard-r*-*.safetensors"))]
    for shard in shards:
        if shard.fingerprint_hash != expected["hash"]:
            raise DataError(_mismatch(shard.path, {"hash": shard.fingerprint_hash}))
    return shards


def _mismatch(path: Path, found: Mapping[str, Any]) -> str:
    what = f"target {found['target']}" if "target" in found else f"fingerprint {found.get('hash')}"
    return (
        f"{path}: teacher data made by another target, item index or settings ({what}); "
        "write this run's teacher data to another directory"
    )


def write_shard(root: str | Path, rank: int, number: int, tensors: Mapping[str, torch.Tensor], fp_hash: str) -> Path:
    """Write one shard atomically; every tensor's first dimension is the sample (``tensors[SAMPLE_ID]`` [S])."""
    root = Path(root)
    samples = tensors[SAMPLE_ID].shape[0]
    if any(t.shape[0] != samples for t in tensors.values()):
        raise ValueError(f"every tensor of a shard needs {samples} rows (one per sample)")
    path = shard_path(root, rank, number)
    meta = {"format": FORMAT, "rank": str(rank), "samples": str(samples), "fingerprint": fp_hash}
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return path


def write_manifest(root: str | Path, fp: Mapping[str, Any], shards: list[ShardInfo]) -> None:
    """``manifest.json``: the fingerprint and every shard (file, rank, samples, sha256 of its bytes)."""
    entries = [ManifestShard(file=s.path.name, rank=s.rank, samples=s.samples, sha256=_sha256(s.path)) for s in shards]
    body = TeacherManifest(fingerprint=dict(fp), samples=sum(s.samples for s in shards), shards=entries)
    write_text_atomic(Path(root) / MANIFEST, json.dumps(body.model_dump(), indent=2) + "\n")


def teacher_fingerprint(target_dir: str | Path, teacher_dir: str | Path) -> dict[str, Any]:
    """The fingerprint complete teacher data in ``teacher_dir`` must carry to belong to the target export
    ``target_dir`` (with the settings it was made with, from its manifest)."""
    manifest = Path(teacher_dir) / MANIFEST
    if not manifest.is_file():
        raise DataError(f"{manifest}: no teacher manifest (run the teacher stage first, or let it finish)")
    return fingerprint(target_dir, read_manifest(manifest).fingerprint.settings)


_VERIFIED: set[tuple[str, int, int, str]] = set()  # (file, size, mtime, sha256) checked in this process


def _listed_hashes(manifest: Path) -> dict[str, str]:
    """{shard file name: sha256} from the manifest; DataError when it predates the hashes."""
    entries = read_manifest(manifest).shards
    if any(entry.sha256 is None for entry in entries):
        raise DataError(
            f"{manifest}: no sha256 for its shards (teacher data written before atspeed recorded them, so an edited "
            "shard would go unnoticed): regenerate the teacher data with the teacher stage"
        )
    return {entry.file: entry.sha256 for entry in entries}


def _verify(path: Path, sha256: str, manifest: Path) -> None:
    """The shard's bytes hash to the manifest's sha256: checked once per shard (and version of it) per process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, sha256)
    if key in _VERIFIED:
        return
    if _sha256(path) != sha256:
        raise DataError(
            f"{path}: its sha256 differs from the one {manifest.name} recorded (edited or corrupted since the teacher "
            "stage wrote it): regenerate the teacher data"
        )
    _VERIFIED.add(key)


class TeacherStore:
    """Read-only access to complete teacher data: ``store[sample_id]`` -> {name: tensor} of that sample."""

    def __init__(self, root: str | Path, expected: Mapping[str, Any]) -> None:
        self.root = Path(root)
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise DataError(f"{manifest}: no teacher manifest (the teacher run is incomplete or elsewhere)")
        listed = _listed_hashes(manifest)
        shards = existing_shards(self.root, expected)
        missing = set(listed) - {s.path.name for s in shards}
        if missing:
            raise DataError(f"{manifest}: lists shards that are missing: {sorted(missing)[:3]}")
        self._where: dict[int, tuple[Path, int]] = {}
        names: list[set[str]] = []
        for shard in shards:
            if shard.path.name not in listed:
                continue
            _verify(shard.path, listed[shard.path.name], manifest)
            with safe_open(str(shard.path), framework="pt") as handle:
                names.append(set(handle.keys()))
                for row, sample in enumerate(handle.get_tensor(SAMPLE_ID).tolist()):
                    self._where[sample] = (shard.path, row)
        self.keys: frozenset[str] = frozenset(set.intersection(*names) if names else set())
        """The tensors every sample has (``sample_id``, ``beams``, ...; ``node_logprobs`` only with distributions)."""

    def __len__(self) -> int:
        return len(self._where)

    def sample_ids(self) -> list[int]:
        return sorted(self._where)

    def __getitem__(self, sample: int) -> dict[str, torch.Tensor]:
        path, row = self._where[sample]
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_slice(key)[row] for key in handle.keys()}  # noqa: SIM118 (not a dict)
