"""One prepared GPU check (``scripts/gpu_check.sh OUT``): everything a session lent a GPU should measure, in one run.

Sections, each guarded (a failure or an exhausted time budget is recorded and the next section still runs) and
written to ``OUT/gpu_check.json`` / ``OUT/gpu_check.md`` as soon as it ends (a killed run keeps what it finished):

- ``gpu_tests``: ``pytest -m gpu tests/integration/test_gpu.py`` in a subprocess (skipped off CUDA, and said so);
- ``smoke_bf16``: ``scripts/bench_decode.py --preset smoke --dtype bfloat16`` on the device, in a subprocess;
- ``decode``: a 7B-shaped random target and a 68M-shaped random draft (bf16, built on the device, no download) over a
  random trie of ~12,000 4-token items on 1024 identifier tokens and random ~150-token prompts: ms per list of
  ``beam``, ``spec_strict`` with the target as its own draft (N = K) and with the draft (N = 40, gamma = 3, whole tree
  and ``budget: auto``) at K = 1, 10, 20 and batch 1 and 8, with host syncs and eager ops per target call (the
  decoding benchmark's own rows, ``atspeed.bench.decode_bench``);
- ``forward_costs``: target and draft ms per forward of 1, 16, 64, 128, 256 tokens after the prompt;
- ``memory``: peak ``torch.cuda.max_memory_allocated``, overall and per section.

``tiny=True``: the same code paths with tiny shapes, a small grid and few requests (a CPU check of the script).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from atspeed.atomic import write_text_atomic
from atspeed.bench.decode_bench import add_speedups, build_grid, run_grid
from atspeed.bench.gpu_check_report import markdown
from atspeed.bench.report import machine, write_json
from atspeed.bench.workload import BOS, EOS, PAD, Workload, parameters
from atspeed.items.trie import PrefixTrie
from atspeed.models.families import family_config, random_model

ROOT = Path(__file__).resolve().parents[2]
LEVELS = 4
FULL = {
    "family": "llama",  # atspeed.models.families: the shapes below are Llama-7B's and its draft's
    "target": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008},
    "draft": {"hidden_size": 768, "num_hidden_layers": 2, "num_attention_heads": 12, "intermediate_size": 3072},
    "base_vocab": 32000, "id_tokens": 1024, "items": 12000, "prompt": 150, "requests": {1: 4, 8: 16},
    "ks": [1, 10, 20], "repeats": 2, "warmup": 1, "cost_repeats": 5, "cost_tokens": [1, 16, 64, 128, 256],
    "budgets": {"gpu_tests": 150, "smoke_bf16": 150, "decode": 210, "forward_costs": 45},
}  # fmt: skip
TINY = FULL | {
    "target": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128},
    "draft": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    "base_vocab": 1000, "id_tokens": 256, "items": 1500, "prompt": 40, "requests": {1: 1, 8: 8}, "repeats": 1,
    "warmup": 0, "cost_repeats": 2,
    # generous: a few minutes at most on an idle 2-core CPU, but a shared machine can be several times slower
    "budgets": {"gpu_tests": 150, "smoke_bf16": 900, "decode": 900, "forward_costs": 300},
}  # fmt: skip
TINY_SMOKE = ["--ks", "3", "--batch-sizes", "1", "--requests", "2", "--draft-beams", "6", "--gammas", "2", "--budgets",
              "none", "--decoders", "beam", "spec_strict", "--repeats", "1", "--cost-repeats", "1"]  # fmt: skip


class OutOfTime(RuntimeError):
    """A section used up its time budget (what it finished is kept)."""


def _random_model(p: dict, shape: dict, vocab: int, device: torch.device, seed: int) -> torch.nn.Module:
    """Random bf16 weights of the check's family built on ``device`` directly (a 7B model is never materialised on
    the host)."""
    config = family_config(p["family"], vocab_size=vocab, max_position_embeddings=1024, pad_token_id=PAD,
                           bos_token_id=BOS, eos_token_id=EOS, **shape)  # fmt: skip
    with torch.device(device):
        return random_model(config, seed, dtype=torch.bfloat16)


def random_workload(p: dict, device: torch.device, seed: int = 0) -> Workload:
    """Target, draft, a trie of ``items`` L-token identifiers over the last ``id_tokens`` tokens, random prompts."""
    vocab, per_level = p["base_vocab"] + p["id_tokens"], p["id_tokens"] // LEVELS
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, per_level, (p["items"], LEVELS), generator=gen) + p["base_vocab"]
    codes = torch.unique(codes + per_level * torch.arange(LEVELS), dim=0)
    count = max(p["requests"].values())
    lengths = torch.randint(p["prompt"] - 10, p["prompt"] + 11, (count,), generator=gen).tolist()
    prompts = [[BOS, *torch.randint(3, p["base_vocab"], (n - 1,), generator=gen).tolist()] for n in lengths]
    targets = torch.randint(0, codes.shape[0], (count, 1), generator=gen).tolist()
    target, draft = (
        _random_model(p, p["target"], vocab, device, seed),
        _random_model(p, p["draft"], vocab, device, seed + 1),
    )
    work = Workload(
        target=target, draft=draft, trie=PrefixTrie.build(codes, vocab, eos_token_id=EOS), levels=LEVELS,
        pad_token_id=PAD, prompts=prompts, targets=targets,
        info={"items": int(codes.shape[0]), "vocab_size": vocab, "prompt_tokens": lengths},
    )  # fmt: skip
    return work.to(device)


def decode_section(work: Workload, p: dict, device: torch.device, deadline: float) -> dict:
    """beam, spec_strict (self-draft, N = K; the draft, N = 40, gamma = 3; and budget auto) per (K, batch size);
    one (K, b) group at a time, none started after ``deadline``."""
    grid = build_grid(["beam", "spec_strict"], p["ks"], list(p["requests"]), [40], [3], [None, "auto"], LEVELS)
    groups: dict[tuple[int, int], list] = {}
    for config in grid:
        groups.setdefault((config.batch_size, config.k), []).append(config)
    rows, skipped = [], []
    for (b, k), configs in groups.items():
        if time.monotonic() > deadline:
            skipped.append({"K": k, "batch_size": b})
            continue
        rows += run_grid(configs, work, {b: p["requests"][b]}, device, p["repeats"], p["warmup"], 0)
    add_speedups(rows)
    info = {"target_parameters": parameters(work.target), "draft_parameters": parameters(work.draft), **work.info}
    out = {"models": info | {"shapes": {"target": p["target"], "draft": p["draft"]}}, "rows": rows}
    if skipped:
        out["skipped_for_time"] = skipped
        raise OutOfTime(f"time budget: {len(skipped)} (K, batch) groups not run", out)
    return out


def gpu_tests(device: torch.device, budget: float) -> dict:
    if device.type != "cuda":
        return {"status": "skipped", "reason": f"device {device.type}: the GPU tests need CUDA"}
    command = [sys.executable, "-m", "pytest", "tests/integration/test_gpu.py", "-m", "gpu", "-q", "-p",
               "no:cacheprovider"]  # fmt: skip
    done = _run(command, budget)
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error)", done["output_tail"])}
    return done | {"counts": counts, "status": "ok" if done["returncode"] == 0 else "failed"}


def smoke(out: Path, device: torch.device, tiny: bool, budget: float) -> dict:
    command = [sys.executable, "scripts/bench_decode.py", "--preset", "smoke", "--device", device.type, "--dtype",
               "bfloat16", "--self-draft", "--out", str(out / "smoke_bf16.json"), "--plot", str(out / "smoke_bf16.png"),
               *(TINY_SMOKE if tiny else [])]  # fmt: skip
    done = _run(command, budget)
    if done["returncode"] != 0:
        raise RuntimeError(f"bench_decode.py exited {done['returncode']}: {done['output_tail'][-2000:]}")
    report = json.loads((out / "smoke_bf16.json").read_text())
    return done | {"report": str(out / "smoke_bf16.json"), "rows": report["rows"], "cost_model": report["cost_model"]}


def _run(command: list[str], budget: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget, check=False)
    except subprocess.TimeoutExpired as err:
        raise OutOfTime(f"time budget of {budget:.0f} s exceeded: {' '.join(command[1:4])}") from err
    return {"command": " ".join(command[1:]), "returncode": done.returncode,
            "output_tail": (done.stdout + done.stderr)[-6000:]}  # fmt: skip


def guarded(name: str, fn: Callable[[], dict], device: torch.device) -> dict:
    """Run one section: its result, or what failed; seconds and (CUDA) peak memory either way."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.monotonic()
    try:
        result = {"status": "ok"} | fn()
    except OutOfTime as err:
        result = {"status": "timeout", "error": str(err.args[0])} | (err.args[1] if len(err.args) > 1 else {})
    except Exception as err:  # the point of a guard: record it, run the next section
        result = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    result["seconds"] = time.monotonic() - started
    result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return result


def check_finite(report: dict) -> list[str]:
    """Paths of the non-finite floats in ``report`` (none expected)."""
    bad: list[str] = []

    def walk(value, path: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(path)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]")

    walk(report, "")
    return bad


def run_check(out: Path, device: torch.device, tiny: bool) -> dict:
    """Every section in turn; the JSON and the Markdown rewritten after each."""
    p = TINY if tiny else FULL
    out.mkdir(parents=True, exist_ok=True)
    report = {"check": "gpu", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "tiny": tiny,
              "machine": machine(device), "sections": {}}  # fmt: skip
    started = time.monotonic()
    work: dict[str, Workload] = {}

    def section(name: str, fn: Callable[[], dict]) -> None:
        report["sections"][name] = guarded(name, fn, device)
        report["total_seconds"] = time.monotonic() - started
        write_json(out / "gpu_check.json", report)
        write_text_atomic(out / "gpu_check.md", markdown(report))

    def workload() -> Workload:
        if "w" not in work:
            work["w"] = random_workload(p, device)
        return work["w"]

    budgets = p["budgets"]
    section("gpu_tests", lambda: gpu_tests(device, budgets["gpu_tests"]))
    section("smoke_bf16", lambda: smoke(out, device, tiny, budgets["smoke_bf16"]))
    section("decode", lambda: decode_section(workload(), p, device, time.monotonic() + budgets["decode"]))
    section("forward_costs", lambda: costs(workload(), p))
    section("memory", lambda: memory(report, device))
    report["nonfinite"] = check_finite(report)  # none expected: listed so a reader need not look
    write_json(out / "gpu_check.json", report)
    return report


def costs(work: Workload, p: dict) -> dict:
    from atspeed.bench.cost_model import forward_costs

    prompt = work.prompts[0][: p["prompt"]]
    ms = {name: forward_costs(model, prompt, p["cost_tokens"], p["cost_repeats"])
          for name, model in (("target", work.target), ("draft", work.draft))}  # fmt: skip
    return {"prompt_tokens": len(prompt), "ms": ms}


def memory(report: dict, device: torch.device) -> dict:
    per_section = {name: s.get("peak_memory_bytes") for name, s in report["sections"].items()}
    if device.type != "cuda":
        return {"status": "skipped", "reason": f"device {device.type}: no CUDA memory statistics"} | {
            "per_section": per_section
        }
    peak = max(v for v in per_section.values() if v is not None)
    return {"peak_bytes": peak, "peak_gib": peak / 2**30, "per_section": per_section,
            "total_gib": torch.cuda.get_device_properties(device).total_memory / 2**30}  # fmt: skip
