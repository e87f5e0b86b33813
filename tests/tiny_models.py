"""Tiny BERT decoders with LoRA for fast tests of the training code."""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertLMHeadModel

from common.config import ModelConfig
from common.model import lora_config


def tiny_lora_bert(seed: int = 0, *, random_lora_b: bool = True) -> PeftModel:
    """A 2-layer, 16-wide BERT decoder with rank-2 LoRA; only LoRA tensors are trainable.

    PEFT starts ``lora_B`` at zero; ``random_lora_b`` gives it values so that every LoRA
    matrix has a non-zero gradient.
    """
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=97,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        is_decoder=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    base = BertLMHeadModel(config)
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    model = get_peft_model(base, lora_config(base, ModelConfig(lora_r=2, lora_alpha=4)))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    if random_lora_b:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.1)
    return model
