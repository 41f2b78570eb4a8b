"""Memory at scale: under ZeRO-3 a checkpoint loads partitioned (no process builds the whole model) and the export
gathers one module at a time into rank 0's CPU copy, LoRA merged there; the weights are the checkpoint's.

The two-process run is ``scripts/bench_zero3_memory.py`` on a tiny checkpoint (the benchmark's own ``--check``):
``SFT.configure_model`` inside ``deepspeed.zero.Init`` as Lightning's DeepSpeedStrategy calls it, gloo, DeepSpeed's
CPU accelerator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from atspeed.callbacks.export import plain_model
from atspeed.models.build import LoraSpec, ModelSpec, apply_lora, build_causal_lm
from tests.integration.test_multinode import _free_port
from tests.integration.tiny_data import ROOT

SIZES = ["--hidden", "64", "--layers", "2", "--intermediate", "128", "--vocab", "256", "--new-tokens", "8"]


@pytest.mark.slow
def test_zero3_loads_a_checkpoint_partitioned_and_exports_it_gathered_module_by_module_to_rank0_cpu(tmp_path) -> None:
    """Right after ``configure_model`` every weight of the checkpoint's layers is a ZeRO-3 partition (only the grown
    embeddings, built whole by transformers, and the LoRA adapters wait for ``deepspeed.initialize``); the export
    gathers at most one module's parameters at a time, lands on rank 0's CPU, and with the adapters merged (B = 0 at
    the start) holds exactly the checkpoint's tensors in the checkpoint's rows."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    script, port = str(ROOT / "scripts/bench_zero3_memory.py"), str(_free_port())
    command = [sys.executable, script, "--checkpoint", str(tmp_path / "ckpt"), *SIZES, "--lora", "--check",
               "--port", port, "--timeout", "240", "--out", str(out)]  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    rank0, rank1 = json.loads(out.read_text())["ranks"]
    for rank in (rank0, rank1):
        whole = rank["whole_after_build"]  # grown embeddings (peft's token_adapter wraps them) and LoRA adapters
        assert all("lora_" in n or "token_adapter" in n for n in whole), whole
        assert any(".layers." in n for n in rank["partitioned_names"]), rank
        assert rank["largest_gather"] <= 2 and rank["gathers"] > 10, rank
    assert rank0["export_devices"] == ["cpu"] and rank0["export_keys_equal"] and rank0["export_equal"]
    assert "export_equal" not in rank1  # only rank 0 keeps a copy


def test_lora_export_merges_on_a_cpu_copy_and_leaves_the_training_model_intact(monkeypatch) -> None:
    """``plain_model`` merges LoRA on a copy whose tensors are fresh CPU tensors (not the training model's), and the
    training model keeps its adapters and weights; the merged weights are base + scale * B A."""
    tokenizer = type("Tokenizer", (), {"__len__": lambda self: 40, "pad_token_id": 0, "bos_token_id": 1,
                                       "eos_token_id": 2})()  # fmt: skip
    model = build_causal_lm(ModelSpec(hidden_size=16, num_layers=1, num_heads=2), tokenizer)
    peft = apply_lora(model, LoraSpec(r=2, dropout=0.0), new_token_ids=[38, 39])
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_()  # B = 0 at the start would make the merge a no-op
    before = {n: p.detach().clone() for n, p in peft.named_parameters()}
    storages = {p.untyped_storage().data_ptr() for p in peft.parameters()}
    merged_on = []
    tuner = type(peft.base_model)  # peft's LoraModel: PeftModel.merge_and_unload forwards to it
    original = tuner.merge_and_unload

    def spy(self, *args, **kwargs):
        tensors = self.state_dict().values()
        shared = any(t.untyped_storage().data_ptr() in storages for t in tensors)
        merged_on.append((self is peft.base_model, {t.device.type for t in tensors}, shared))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tuner, "merge_and_unload", spy)
    plain = plain_model(peft)
    assert merged_on == [(False, {"cpu"}, False)]
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in peft.named_parameters())
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    expected = layer.base_layer.weight + delta
    torch.testing.assert_close(plain.model.layers[0].self_attn.q_proj.weight, expected)
