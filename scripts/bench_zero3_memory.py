"""Peak host memory of loading a Hugging Face checkpoint under DeepSpeed ZeRO-3, per process and summed.

    DS_ACCELERATOR=cpu python scripts/bench_zero3_memory.py --out runs/bench/zero3_memory.json
    DS_ACCELERATOR=cpu python scripts/bench_zero3_memory.py --hidden 64 --layers 2 --intermediate 128 --vocab 256 \\
        --lora --check --out /tmp/check.json          # a tiny model, weights checked (the tests run this)

Writes a random Llama (--hidden, --layers, --intermediate, --vocab; the defaults give about 300M parameters) with
``save_pretrained`` (safetensors) into --checkpoint (kept and reused when it exists), then starts --procs CPU processes
with torchrun (gloo, DeepSpeed's CPU accelerator). Each does what Lightning's DeepSpeedStrategy does under ZeRO-3:
``SFT.configure_model`` inside ``deepspeed.zero.Init`` (the model of ``--checkpoint``, its vocabulary grown by
--new-tokens identifier tokens; --lora adds adapters and trainable token rows), then ``deepspeed.initialize`` (no
optimizer), and reports its peak resident memory (``ru_maxrss``) and whether the model came out of ``configure_model``
partitioned. --check then exports through ``callbacks.export.plain_model`` (gathered to rank 0's CPU, LoRA merged) and
compares the weights with the checkpoint's. Prints a table and writes the JSON (--out). Run it with little else on the
machine: the numbers are whole-process peaks, and the default model needs a few GB.

On CPU the partitions themselves are host memory (on GPUs they are not), and glibc's malloc keeps much of the memory
freed while layers are built and partitioned one after another: ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment
returns it, which shows the partitioned load's own footprint.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]


def _config(args: argparse.Namespace) -> dict:
    """ZeRO-3 in fp32, every parameter partitioned (DeepSpeed keeps parameters under 100k elements whole otherwise)."""
    return {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}  # fmt: skip


def write_checkpoint(args: argparse.Namespace) -> int:
    """The random Llama of the sizes in ``args`` in ``args.checkpoint`` (reused when there); its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(args.checkpoint)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 2),
                         max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip
    if not (path / "model.safetensors").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def _stub_trainer(args: argparse.Namespace, config: dict) -> SimpleNamespace:
    """What ``SFT.configure_model`` reads of its trainer: the tokenizer's size, the identifier tokens, the strategy."""
    size = args.vocab + args.new_tokens
    tokenizer = type("Tokenizer", (), {"__len__": lambda self: size})()
    ids = torch.arange(args.vocab, size).view(-1, 1)
    prepared = SimpleNamespace(tokenizer=tokenizer, item_token_ids=ids)
    return SimpleNamespace(datamodule=SimpleNamespace(prepared=prepared), strategy=SimpleNamespace(config=config))


def worker(args: argparse.Namespace) -> None:
    """One process of the torchrun world: load, partition, report (``--check``: export and compare)."""
    import deepspeed

    from atspeed.models.build import LoraSpec, ModelSpec
    from atspeed.modules.sft import SFT

    deepspeed.init_distributed(dist_backend="gloo")
    rank, config = torch.distributed.get_rank(), _config(args)
    lora = LoraSpec(r=4, dropout=0.0) if args.lora else None
    module = SFT(model=ModelSpec(path=args.checkpoint), lora=lora)
    module._trainer = _stub_trainer(args, config)
    start = time.perf_counter()
    with deepspeed.zero.Init(config_dict_or_path=config):
        module.configure_model()
    named = list(module.model.named_parameters())
    report = {"rank": rank, "params": len(named), "build_maxrss_mb": _maxrss_mb(), **_rss_split(),
              "partitioned_names": [n for n, p in named if hasattr(p, "ds_id")],
              "whole_after_build": [n for n, p in named if not hasattr(p, "ds_id")]}  # fmt: skip
    trainable = [p for _, p in named if p.requires_grad]
    deepspeed.initialize(model=module.model, config=config, model_parameters=trainable)
    report["seconds"] = time.perf_counter() - start
    report["maxrss_mb"] = _maxrss_mb()
    if args.check:
        report.update(_check(module, args, rank == 0))
    Path(args.report_dir, f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.barrier()
    # Without this the gloo group's threads outlive the interpreter's teardown and a rank can abort on exit
    # ("terminate called without an active exception", SIGABRT) after its report is written: seen once in CI.
    torch.distributed.destroy_process_group()


def _check(module, args: argparse.Namespace, keep: bool) -> dict:
    """Export as the callback does and compare with the checkpoint (on rank 0): the checkpoint's rows and tensors."""
    import deepspeed
    from safetensors.torch import load_file

    from atspeed.callbacks.export import plain_model

    sizes, original = [], deepspeed.zero.GatheredParameters

    def spy(params, *a, **k):  # how many parameters each gather makes whole
        sizes.append(len(params) if isinstance(params, list) else 1)
        return original(params, *a, **k)

    deepspeed.zero.GatheredParameters = spy
    try:
        model = plain_model(module.export_model(), keep=keep)
    finally:
        deepspeed.zero.GatheredParameters = original
    result = {"largest_gather": max(sizes, default=0), "gathers": len(sizes)}
    if keep:
        expected = load_file(Path(args.checkpoint) / "model.safetensors")
        state = model.state_dict()
        result["export_keys_equal"] = sorted(state) == sorted(expected)
        result["export_devices"] = sorted({str(t.device) for t in state.values()})
        result["export_equal"] = all(torch.equal(state[k][: v.shape[0]], v) for k, v in expected.items())
    return result


def _rss_split() -> dict[str, float]:
    """Resident memory now, anonymous (the process's own tensors) and file-backed (memory-mapped safetensors pages,
    shared with the page cache), from /proc/self/status (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {f"build_{key.lower()}_mb": int(fields[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile")}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def launch(args: argparse.Namespace, report_dir: str) -> list[dict]:
    """``--procs`` workers under torchrun; their reports, by rank."""
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT)), "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "PYTHONWARNINGS": "ignore"}  # fmt: skip
    forward = [a for a in sys.argv[1:] if a != "--worker"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.procs),
               "--master_port", str(args.port), __file__, "--worker", "--report-dir", report_dir, *forward]  # fmt: skip
    subprocess.run(command, env=env, check=True, timeout=args.timeout)
    return [json.loads((Path(report_dir) / f"rank{r}.json").read_text()) for r in range(args.procs)]


def table(rows: list[dict]) -> str:
    from atspeed.tables import text_table

    cells = [
        [str(row["rank"]), f"{row['build_maxrss_mb']:.0f}",
         f"{row['build_rssanon_mb']:.0f}/{row['build_rssfile_mb']:.0f}", f"{row['maxrss_mb']:.0f}",
         f"{len(row['partitioned_names'])}/{row['params']}", f"{row['seconds']:.1f}"]
        for row in rows
    ]  # fmt: skip
    build, peak = sum(r["build_maxrss_mb"] for r in rows), sum(r["maxrss_mb"] for r in rows)
    cells.append(["sum", f"{build:.0f}", "", f"{peak:.0f}", "", ""])
    columns = ["rank", "after build MB", "anon/file MB", "peak RSS MB", "partitioned", "seconds"]
    return text_table(columns, cells)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/bench/llama300m", help="the random checkpoint (kept)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--new-tokens", type=int, default=8, help="identifier tokens added to the vocabulary")
    parser.add_argument("--lora", action="store_true", help="LoRA adapters and trainable identifier rows")
    parser.add_argument("--check", action="store_true", help="export and compare the weights with the checkpoint")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default=None, help="JSON report")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report-dir", default=None, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = _parser().parse_args()
    if args.worker:
        worker(args)
        return
    count = write_checkpoint(args)
    with tempfile.TemporaryDirectory() as report_dir:
        rows = launch(args, report_dir)
    print(f"{count / 1e6:.1f}M parameters, {args.procs} processes, ZeRO-3 on CPU")
    print(table(rows))
    if args.out:
        from atspeed.atomic import write_text_atomic

        report = {"parameters": count, "procs": args.procs, "checkpoint": args.checkpoint, "ranks": rows,
                  "sum_maxrss_mb": sum(r["maxrss_mb"] for r in rows), "argv": sys.argv[1:]}  # fmt: skip
        write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
