"""FedProx's proximal term on the client: gradients with and without DP-SGD."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from tiny_models import tiny_lora_bert

from client.train import PerSampleCausalLoss, ProximalTerm, backward_batch, train_local
from common.config import PrivacyConfig, TrainConfig
from common.text import IGNORE_INDEX, EncodedExample

MU = 0.7


def random_batch(batch_size=4, length=10, vocab=97, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX
    return input_ids, attention_mask, labels


def moved_proximal_term(params) -> ProximalTerm:
    """Proximal term anchored at the current values, after which every parameter moves."""
    proximal = ProximalTerm(params, mu=MU)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return proximal


def test_value_is_half_mu_squared_distance():
    model = tiny_lora_bert()
    params = [p for p in model.parameters() if p.requires_grad]
    proximal = moved_proximal_term(params)
    squared = sum(float(((p.detach() - a) ** 2).sum()) for p, a in zip(params, proximal.anchors))
    assert squared > 0
    assert float(proximal.value()) == pytest.approx(0.5 * MU * squared, rel=1e-5)


def test_term_adds_mu_times_distance_to_gradient():
    loss_module = PerSampleCausalLoss(tiny_lora_bert())
    params = [p for p in loss_module.parameters() if p.requires_grad]
    proximal = moved_proximal_term(params)
    batch = random_batch()

    backward_batch(loss_module, batch)
    without = [p.grad.clone() for p in params]
    loss_module.zero_grad(set_to_none=True)
    backward_batch(loss_module, batch, proximal)
    for p, anchor, base in zip(params, proximal.anchors, without):
        torch.testing.assert_close(p.grad - base, MU * (p.detach() - anchor), rtol=1e-4, atol=1e-6)


def test_term_reaches_every_per_sample_gradient_under_dp():
    # Opacus' hooks never see a term that reads parameters directly, so without
    # add_to_grad_samples the term would vanish from the clipped DP-SGD gradient.
    wrapped = GradSampleModule(PerSampleCausalLoss(tiny_lora_bert()), loss_reduction="mean")
    params = [p for p in wrapped.parameters() if p.requires_grad]
    proximal = moved_proximal_term(params)
    batch = random_batch()

    backward_batch(wrapped, batch)
    without = [p.grad_sample.clone() for p in params]
    wrapped.zero_grad(set_to_none=True)
    for p in params:
        p.grad_sample = None
    backward_batch(wrapped, batch, proximal)
    for p, anchor, base in zip(params, proximal.anchors, without):
        assert p.grad_sample.shape[0] == 4
        expected = (MU * (p.detach() - anchor)).unsqueeze(0).expand_as(base)
        torch.testing.assert_close(p.grad_sample - base, expected, rtol=1e-4, atol=1e-6)
    wrapped._close()


def examples(count=8, length=10, vocab=97):
    generator = torch.Generator().manual_seed(2)
    result = []
    for _ in range(count):
        ids = torch.randint(5, vocab, (length,), generator=generator).tolist()
        result.append(EncodedExample(tuple(ids), tuple([IGNORE_INDEX] * 4 + ids[4:])))
    return result


def train_distance(proximal_mu: float, dp: bool) -> float:
    """L2 distance from the start after a few local steps with ``proximal_mu``."""
    model = tiny_lora_bert()
    start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    train_local(
        model,
        examples(),
        train=TrainConfig(batch_size=4, learning_rate=0.05),
        privacy=PrivacyConfig(dp=dp, clipping_norm=10.0),
        noise_multiplier=0.0,
        pad_token_id=0,
        seed=0,
        steps=6,
        proximal_mu=proximal_mu,
    )
    moved = [p.detach() for p in model.parameters() if p.requires_grad]
    return float(sum(((p - s) ** 2).sum() for p, s in zip(moved, start)) ** 0.5)


@pytest.mark.parametrize("dp", [False, True])
def test_large_mu_keeps_training_near_global_adapter(dp):
    free = train_distance(0.0, dp)
    held = train_distance(50.0, dp)
    assert free > 0
    assert held < 0.8 * free
