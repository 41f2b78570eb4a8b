"""The tiny SFT run on a CUDA device (skipped without one; CI has none)."""

from __future__ import annotations

import pytest
import torch

from atspeed.cli import main
from tests.integration.tiny_data import tiny_args, write_processed


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_tiny_fit_on_gpu(tmp_path, precision: str) -> None:
    data = write_processed(tmp_path / "data")
    args = tiny_args(data, tmp_path / "run", "--trainer.accelerator", "gpu", "--trainer.precision", precision)
    cli = main(["fit", *args])
    assert cli.trainer.global_step == 8
    assert next(cli.model.model.parameters()).is_cuda
    assert 0.0 <= float(cli.trainer.callback_metrics["val/recall@3"]) <= 1.0


def _tiny_llama(seed: int, hidden: int, layers: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_speculative_decoding_on_gpu(dtype: torch.dtype) -> None:
    """On CUDA: spec_strict equals the target's beam search (fp32; bf16 near-ties may differ, so only validity)."""
    from atspeed.decoding.decoders import DecodeSettings, decode
    from atspeed.items.trie import PrefixTrie

    vocab, levels = 60, 4
    gen = torch.Generator().manual_seed(0)
    ids = torch.unique(torch.randint(4, vocab, (400, levels), generator=gen), dim=0)
    trie = PrefixTrie.build(ids, vocab, eos_token_id=2).to("cuda")
    target = _tiny_llama(0, 32, 2, vocab).to("cuda", dtype)
    draft = _tiny_llama(1, 16, 1, vocab).to("cuda", dtype)
    prompts = torch.randint(4, vocab, (3, 12), generator=gen).cuda()
    mask = torch.ones_like(prompts)
    mask[1, :4] = 0
    settings = DecodeSettings(num_beams=10, levels=levels, draft_beams=20, gamma=3)
    beam = decode("beam", target, prompts, mask, trie, settings)
    strict = decode("spec_strict", target, prompts, mask, trie, settings, draft=draft)
    relaxed = decode("spec_relaxed", target, prompts, mask, trie, settings, draft=draft)
    for out in (beam, strict, relaxed):
        assert out.sequences.is_cuda
        assert bool((trie.lookup(out.sequences.reshape(-1, levels)) >= 0).all())
    if dtype == torch.float32:
        assert torch.equal(strict.sequences, beam.sequences)
        torch.testing.assert_close(strict.scores, beam.scores, atol=1e-3, rtol=0)
