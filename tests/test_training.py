"""DP-SGD training of the LoRA adapter: per-sample loss, per-sample gradients, real updates."""

from __future__ import annotations

import random

import pytest
import torch
from opacus import GradSampleModule
from tiny_models import tiny_lora_bert

from client.train import PerSampleCausalLoss, train_local
from common.config import ModelConfig, PrivacyConfig, TrainConfig
from common.model import build_lora_model, is_lora_key
from common.text import IGNORE_INDEX, EncodedExample


def _random_batch(batch_size=4, length=10, vocab=97, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 7:] = 0  # one padded sample
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX  # prompt
    labels[attention_mask == 0] = IGNORE_INDEX
    return input_ids, attention_mask, labels


def test_per_sample_loss_matches_each_sample_alone():
    model = tiny_lora_bert()
    loss_module = PerSampleCausalLoss(model).eval()
    input_ids, attention_mask, labels = _random_batch()
    batched = loss_module(input_ids, attention_mask, labels)
    assert batched.shape == (4,)
    for i in range(4):
        alone = loss_module(input_ids[i : i + 1], attention_mask[i : i + 1], labels[i : i + 1])
        assert float(alone[0]) == pytest.approx(float(batched[i]), rel=1e-5)


def test_per_sample_gradients_sum_to_batch_gradient():
    model = tiny_lora_bert()
    input_ids, attention_mask, labels = _random_batch()

    # Batch gradient of the summed loss, by plain autograd.
    reference = PerSampleCausalLoss(model)
    reference(input_ids, attention_mask, labels).sum().backward()
    expected = {
        name: p.grad.clone() for name, p in reference.named_parameters() if p.requires_grad
    }
    model.zero_grad(set_to_none=True)

    # Per-sample gradients from Opacus hooks on a fresh wrapper of the same model.
    wrapped = GradSampleModule(PerSampleCausalLoss(model), loss_reduction="sum")
    wrapped(input_ids, attention_mask, labels).sum().backward()
    trainable = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(is_lora_key(n) for n, _ in trainable)
    for name, parameter in trainable:
        assert parameter.grad_sample.shape[0] == 4
        key = name.removeprefix("_module.")
        torch.testing.assert_close(
            parameter.grad_sample.sum(dim=0), expected[key], rtol=1e-4, atol=1e-6
        )
    wrapped._close()


def _e2e_like_examples(tokenizer, count=24):
    from common.text import encode_example

    venues = ["The Eagle", "Aromi", "Cotto", "Zizzi"]
    foods = ["French", "Italian", "Chinese", "English"]
    examples = []
    for i in range(count):
        venue, food = venues[i % 4], foods[(i // 4) % 4]
        source = f"name[{venue}], eatType[coffee shop], food[{food}]"
        text = f"{venue} is a coffee shop serving {food} food."
        examples.append(encode_example(tokenizer, source, text, max_length=64))
    return examples


def test_dp_step_changes_lora_weights_of_real_model():
    from common.model import load_tokenizer

    model = build_lora_model(ModelConfig(), seed=0)
    tokenizer = load_tokenizer("minilm-l6")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen_before = model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight.clone()
    result = train_local(
        model,
        _e2e_like_examples(tokenizer),
        train=TrainConfig(batch_size=8, learning_rate=1e-2),
        privacy=PrivacyConfig(dp=True, clipping_norm=1.0),
        noise_multiplier=1.0,
        pad_token_id=tokenizer.pad_token_id,
        seed=0,
        steps=2,
    )
    assert result.steps == 2
    assert result.sample_rate == pytest.approx(8 / 24)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    # Every LoRA matrix moves: lora_B from its zero init, lora_A through the noisy step.
    assert len(changed) == len(before)
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    torch.testing.assert_close(
        model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight,
        frozen_before,
    )
    # Opacus hooks are removed, so the model trains again in the next round.
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_non_dp_training_lowers_loss():
    from client.train import evaluate_loss
    from common.model import load_tokenizer

    random.seed(0)
    model = build_lora_model(ModelConfig(), seed=0)
    tokenizer = load_tokenizer("minilm-l6")
    examples = _e2e_like_examples(tokenizer)
    before = evaluate_loss(model, examples, pad_token_id=tokenizer.pad_token_id)
    train_local(
        model,
        examples,
        train=TrainConfig(batch_size=8, learning_rate=5e-3),
        privacy=PrivacyConfig(dp=False),
        noise_multiplier=0.0,
        pad_token_id=tokenizer.pad_token_id,
        seed=0,
        steps=6,
    )
    after = evaluate_loss(model, examples, pad_token_id=tokenizer.pad_token_id)
    assert after < before - 1.0


def test_empty_partition_is_rejected():
    model = tiny_lora_bert()
    with pytest.raises(ValueError, match="empty partition"):
        train_local(
            model,
            [],
            train=TrainConfig(),
            privacy=PrivacyConfig(),
            noise_multiplier=1.0,
            pad_token_id=0,
            seed=0,
        )


def test_encoded_example_masks_prompt():
    from common.model import load_tokenizer
    from common.text import encode_example

    tokenizer = load_tokenizer("minilm-l6")
    example = encode_example(tokenizer, "name[Aromi]", "Aromi is nice.", max_length=32)
    assert isinstance(example, EncodedExample)
    prompt_length = example.labels.count(IGNORE_INDEX)
    assert example.input_ids[0] == tokenizer.cls_token_id
    assert example.input_ids[prompt_length - 1] == tokenizer.sep_token_id
    assert example.labels[-1] == tokenizer.sep_token_id
    with pytest.raises(ValueError, match="over model.max-length = 5"):
        encode_example(tokenizer, "name[Aromi]", "Aromi is nice.", max_length=5, origin="f.csv:3")


def _tiny_examples(count=6, length=9):
    generator = torch.Generator().manual_seed(3)
    examples = []
    for _ in range(count):
        ids = torch.randint(5, 97, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * 3 + ids[3:]
        examples.append(EncodedExample(input_ids=tuple(ids), labels=tuple(labels)))
    return examples


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_step_is_learning_rate_times_mean_gradient(momentum):
    from client.train import EncodedDataset, _trim

    examples = _tiny_examples()
    model = tiny_lora_bert()
    dataset = EncodedDataset(examples, pad_token_id=0)
    batch = _trim(tuple(torch.stack(column) for column in zip(*(dataset[i] for i in range(6)))))
    PerSampleCausalLoss(model)(*batch).mean().backward()
    expected = {
        n: (p - 0.5 * p.grad).detach() for n, p in model.named_parameters() if p.requires_grad
    }
    model.zero_grad(set_to_none=True)
    train_local(
        model,
        examples,
        train=TrainConfig(batch_size=6, learning_rate=0.5, optimizer="sgd", momentum=momentum),
        privacy=PrivacyConfig(dp=False),
        noise_multiplier=0.0,
        pad_token_id=0,
        seed=0,
        steps=1,
    )
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.detach(), expected[name], rtol=1e-4, atol=1e-6)


def test_unknown_optimizer_is_rejected():
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="train.optimizer"):
        TrainConfig(optimizer="lamb")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_head_transform_gets_its_own_learning_rate(optimizer):
    from client.train import make_optimizer

    head = torch.nn.Parameter(torch.zeros(3))
    lora = torch.nn.Parameter(torch.zeros(3))
    named = [("cls.transform.modules_to_save.default.dense.weight", head), ("q.lora_B.w", lora)]
    built = make_optimizer(
        named, TrainConfig(learning_rate=2.0, head_learning_rate=0.05, optimizer=optimizer)
    )
    rates = {id(p): group["lr"] for group in built.param_groups for p in group["params"]}
    assert rates == {id(lora): 2.0, id(head): 0.05}
    same = make_optimizer(named, TrainConfig(learning_rate=2.0, optimizer=optimizer))
    assert {group["lr"] for group in same.param_groups} == {2.0}
