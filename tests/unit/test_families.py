"""The model family table (``atspeed.models.families``) and the checkpoint type allow-list read from signatures."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config

from atspeed.checkpoint_types import checkpoint_types
from atspeed.data.datamodule import EvalSpec, RecDataModule
from atspeed.data.item_index import SemanticIdSpec
from atspeed.errors import DataError
from atspeed.losses import LossOptions
from atspeed.models.build import LoraSpec, ModelSpec, build_causal_lm
from atspeed.models.families import FAMILIES, check_attention, family_config, family_of
from atspeed.models.tokenizer import build_word_tokenizer
from atspeed.modules.align import Align
from atspeed.modules.recommend import Recommender
from atspeed.modules.sft import SFT
from atspeed.modules.teacher import Teacher


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(["History: {history}. Next:"], ["<a_0>", "<b_1>"])


def test_every_family_builds_its_own_model_type_from_the_same_sizes(tokenizer) -> None:
    for family in FAMILIES:
        model = build_causal_lm(ModelSpec(family=family, hidden_size=16, num_layers=1, num_heads=2), tokenizer)
        assert model.config.model_type == family and family_of(model.config) == family
        assert model.config.num_key_value_heads == 2 and model.training
        assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    qwen2 = build_causal_lm(ModelSpec(family="qwen2", hidden_size=16, num_layers=1, num_heads=2), tokenizer)
    attention = qwen2.model.layers[0].self_attn
    assert attention.q_proj.bias is not None and attention.o_proj.bias is None  # Qwen2's biased q/k/v
    assert not qwen2.config.use_sliding_window and qwen2.config.layer_types == ["full_attention"]


def test_a_llama_built_from_sizes_has_the_weights_it_had_before_the_table(tokenizer) -> None:
    """Same seed, same weights as ``LlamaForCausalLM(LlamaConfig(...))`` under ``torch.manual_seed``."""
    model = build_causal_lm(ModelSpec(hidden_size=16, num_layers=1, num_heads=2), tokenizer, seed=3)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(3)
    reference = LlamaForCausalLM(config)
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(got, want), name


def test_family_config_sets_the_key_value_heads_and_refuses_an_unknown_family() -> None:
    config = family_config("qwen2", hidden_size=16, num_attention_heads=4, num_hidden_layers=1)
    assert isinstance(config, Qwen2Config) and config.num_key_value_heads == 4  # Qwen2's own default is 32
    assert family_config("llama", num_attention_heads=4, num_key_value_heads=2).num_key_value_heads == 2
    with pytest.raises(ValueError, match="unknown model family 'gpt2'"):
        family_config("gpt2")


@pytest.mark.parametrize(
    "config",
    [
        Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=0, num_hidden_layers=2),
        SimpleNamespace(model_type="mistral", layer_types=["full_attention", "sliding_attention"]),
    ],
    ids=["qwen2", "layer_types"],
)
def test_sliding_window_attention_is_refused_naming_the_key(config) -> None:
    with pytest.raises(DataError, match=r"^model\.path: .*sliding-window"):
        check_attention(config, "model.path")


def test_full_attention_configs_pass() -> None:
    for config in (Qwen2Config(sliding_window=4096), LlamaConfig(), family_config("qwen2", num_attention_heads=2)):
        check_attention(config, "model.path")


def test_the_checkpoint_allow_list_is_read_from_the_signatures() -> None:
    """The stages' types (the list once kept by hand in cli.py), and a new options type as soon as a signature
    names it, nested dataclass fields included."""
    allowed = checkpoint_types([SFT, Align, Recommender, Teacher, RecDataModule])
    hand_kept = [ModelSpec, LoraSpec, SemanticIdSpec, EvalSpec, LossOptions, PositiveInt, NonNegativeInt, PositiveFloat]
    assert set(hand_kept) <= set(allowed)
    assert not {int, float, str, bool, type(None)} & set(allowed)
    assert set(checkpoint_types([NewStage])) == {NewOptions, NewInner, PositiveFloat, ModelSpec, PositiveInt}


@dataclass
class NewInner:
    rate: PositiveFloat = 1.0


@dataclass
class NewOptions:
    inner: NewInner | None = None


class NewStage:
    def __init__(self, options: NewOptions | None = None, sizes: list[ModelSpec] | None = None, k: int = 1) -> None:
        pass


def test_the_cli_allows_every_type_its_stages_save() -> None:
    import atspeed.cli as cli

    wanted = checkpoint_types([*cli.STAGE_MODULES, RecDataModule])
    assert ModelSpec in wanted and set(wanted) <= set(torch.serialization.get_safe_globals())
