"""The CLI stages on a CUDA device, nothing moved by hand (skipped without one; CI has none): SFT fit with
validation, teacher data, alignment with validation, predict, and the tiny pipeline shaped like the quick start's, in
bf16 where the stage allows it. The trie, the prompts and every helper tensor follow the model's device."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from atspeed.cli import main
from atspeed.pipeline import read_pipeline, run_pipeline
from tests.integration.test_pipeline import DRAFT_SIZES, tiny_pipeline
from tests.integration.tiny_data import align_args, decode_args, teacher_args, tiny_args, write_processed

pytestmark = pytest.mark.gpu
GPU = ["--trainer.accelerator", "gpu", "--trainer.devices", "1"]
BF16 = ["--trainer.precision", "bf16-mixed"]


@pytest.fixture(autouse=True)
def _matmul_precision():
    """The CLI sets TF32 for CUDA runs (matmul_precision high) process-wide: put torch's setting back after."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_tiny_fit_validates_on_gpu(tmp_path, precision: str) -> None:
    data = write_processed(tmp_path / "data")
    cli = main(["fit", *tiny_args(data, tmp_path / "run", *GPU, "--trainer.precision", precision)])
    assert cli.trainer.global_step == 8
    assert next(cli.model.model.parameters()).is_cuda
    assert 0.0 <= float(cli.trainer.callback_metrics["val/recall@3"]) <= 1.0
    assert torch.get_float32_matmul_precision() == "high"  # TF32 on CUDA runs (the CLI's matmul_precision)


@pytest.fixture(scope="module")
def gpu_exported(tmp_path_factory):
    """(data, target export, draft export): the tiny SFT fits, in bf16 on the GPU."""
    root = tmp_path_factory.mktemp("gpu")
    data = write_processed(root / "data")
    main(["fit", *tiny_args(data, root / "target", *GPU, *BF16)])
    main(["fit", *tiny_args(data, root / "draft", *DRAFT_SIZES, *GPU, *BF16)])
    return data, root / "target" / "hf", root / "draft" / "hf"


def test_teacher_alignment_and_predict_on_gpu(gpu_exported, tmp_path) -> None:
    bf16_weights = ["--model.init_args.dtype", "bfloat16"]
    teacher = main(["predict", *teacher_args(gpu_exported, tmp_path / "teacher", *GPU, *bf16_weights)])
    assert next(teacher.model.target_model.parameters()).is_cuda
    assert (tmp_path / "teacher" / "data" / "manifest.json").is_file()
    for mode in ("cached", "on_policy"):
        out = tmp_path / f"align_{mode}"
        args = align_args(gpu_exported, tmp_path / "teacher" / "data", out, *GPU, *BF16, *bf16_weights,
                          "--model.init_args.teacher", mode)  # fmt: skip
        align = main(["fit", *args])
        assert next(align.model.draft.parameters()).is_cuda and align.model.frozen.model.dtype == torch.bfloat16
        assert "val/mean_accepted_depth" in align.trainer.callback_metrics and (out / "hf").is_dir()
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"decode_{dtype}"
        extra = [*GPU, "--model.init_args.dtype", dtype, "--model.init_args.compare_beam", "true"]
        cli = main(["predict", *decode_args(gpu_exported, out, *extra)])
        assert next(cli.model.target_model.parameters()).is_cuda
        report = json.loads((out / "r.json").read_text())
        assert 0.0 <= report["metrics"]["test/recall@3"] <= 1.0 and report["speed"]["ratio_over_beam"] > 0


def test_the_tiny_pipeline_on_gpu(tmp_path) -> None:
    """The pipeline of test_pipeline (SFT target and draft, teacher, alignment, HF / beam / two speculative decodes)
    on the GPU, training in bf16; decoding in float32 without TF32, so strict decoding returns beam search's lists."""
    path = tiny_pipeline(tmp_path)
    raw = yaml.safe_load(path.read_text())
    for stage in raw["stages"]:
        fit = stage["run"][0] == "fit"
        stage["run"] += [*GPU, *(BF16 if fit else ["--matmul_precision", "highest"])]
    path.write_text(yaml.safe_dump(raw))
    run_pipeline(read_pipeline(path))
    rows = {row["stage"]: row for row in json.loads((tmp_path / "summary.json").read_text())["rows"]}
    assert list(rows) == ["decode_hf", "decode_beam", "spec_sft_draft", "spec_aligned"]
    for name in ("spec_sft_draft", "spec_aligned"):
        assert rows[name]["equals_beam"] is True and rows[name]["x_beam"] > 0


def _tiny_model(seed: int, hidden: int, layers: int, vocab: int, family: str = "llama"):
    from atspeed.models.families import family_config, random_model

    config = family_config(
        family, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=128, initializer_range=0.2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    return random_model(config, seed)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_speculative_decoding_on_gpu_with_the_trie_on_the_cpu(dtype: torch.dtype, family: str) -> None:
    """On CUDA, the trie left on the CPU: spec_strict equals the target's beam search (fp32 without TF32; bf16
    near-ties may differ, so only validity)."""
    from atspeed.decoding.decoders import DecodeSettings, decode
    from atspeed.items.trie import PrefixTrie

    torch.set_float32_matmul_precision("highest")
    vocab, levels = 60, 4
    gen = torch.Generator().manual_seed(0)
    ids = torch.unique(torch.randint(4, vocab, (400, levels), generator=gen), dim=0)
    trie = PrefixTrie.build(ids, vocab, eos_token_id=2)
    target = _tiny_model(0, 32, 2, vocab, family).to("cuda", dtype)
    draft = _tiny_model(1, 16, 1, vocab, family).to("cuda", dtype)
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
    assert trie.device.type == "cpu"  # the caller's trie is left where it was
    if dtype == torch.float32:
        assert torch.equal(strict.sequences, beam.sequences)
        torch.testing.assert_close(strict.scores, beam.scores, atol=1e-3, rtol=0)
