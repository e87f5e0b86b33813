"""Base model loading by alias, folder and hub id; LoRA targets per architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from common.config import ModelConfig
from common.model import (
    build_lora_model,
    load_base_model,
    lora_target_modules,
    resolve_model,
)


def test_alias_resolves_to_packaged_minilm():
    resolved = resolve_model("minilm-l6")
    assert resolved.is_local
    assert resolved.location.endswith("model")


def test_unknown_name_is_treated_as_hub_id():
    resolved = resolve_model("some-org/some-model")
    assert not resolved.is_local
    assert resolved.location == "some-org/some-model"


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_minilm_loads_as_causal_decoder_with_identity_head():
    model = load_base_model("minilm-l6")
    assert model.config.is_decoder
    transform = model.cls.predictions.transform
    torch.testing.assert_close(transform.dense.weight, torch.eye(384))
    assert not any(p.requires_grad for p in model.parameters())
    # Causal: changing a later token does not change an earlier position's output.
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    changed = ids.clone()
    changed[0, 4] = 4937
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = model(input_ids=changed).logits
    torch.testing.assert_close(a[0, :4], b[0, :4])


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)),
            ["c_attn", "c_proj", "c_fc"],
        ),
        (
            lambda: LlamaForCausalLM(
                LlamaConfig(
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    num_key_value_heads=2,
                    vocab_size=50,
                )
            ),
            ["q_proj", "k_proj", "v_proj", "o_proj"],
        ),
    ],
)
def test_tiny_causal_lms_load_from_folder_with_lora(tmp_path, make, expected):
    make().save_pretrained(tmp_path)
    base = load_base_model(str(tmp_path))
    assert lora_target_modules(base) == expected
    model = build_lora_model(ModelConfig(name=str(tmp_path), lora_r=2), seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(expected[0] in n for n in trainable)
