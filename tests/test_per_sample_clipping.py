"""Record-level DP-SGD clips each sample's gradient on its own, across every trained tensor.

The checks run one step of :func:`client.train.train_local`, so the model goes through the
project's own wrapping: :class:`client.train.PerSampleCausalLoss`, ``make_private`` with
hooks and Poisson sampling, and :func:`client.train.backward_batch`. The batch size equals
the number of examples, so the sample rate is 1 and the one batch contains every example. A
spy on Opacus' ``DPOptimizer.add_noise`` reads two tensors just after clipping: each
sample's gradient row (``p.grad_sample``) and the sum of the clipped rows
(``p.summed_grad``). The noise multiplier is 0, so that sum alone moves the weights.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from opacus.optimizers import DPOptimizer
from tiny_models import tiny_lora_bert

from client import train as train_module
from client.train import PerSampleCausalLoss, train_local
from common.config import ModelConfig, PrivacyConfig, TrainConfig
from common.model import build_lora_model
from common.text import IGNORE_INDEX, EncodedExample

NUM_EXAMPLES = 6
PROMPT_LENGTH = 3
LEARNING_RATE = 0.1


def _tiny_model(*, train_head: bool) -> torch.nn.Module:
    """Build the 16-wide test decoder with LoRA.

    With ``train_head`` the head transform is trained too, by the rule of
    :func:`common.model.build_lora_model`.
    """
    model = tiny_lora_bert()
    if train_head:
        for name, parameter in model.named_parameters():
            if "modules_to_save" in name:
                parameter.requires_grad_(True)
    return model


def _minilm_with_head() -> torch.nn.Module:
    """Build the default MiniLM model with ``train_head=True`` and small random ``lora_B`` values.

    PEFT starts ``lora_B`` at zero, which makes every ``lora_A`` gradient zero.
    """
    model = build_lora_model(ModelConfig(train_head=True), seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def _examples(vocab_size: int) -> list[EncodedExample]:
    """Build examples of different lengths, so the batch is padded.

    The first token of example ``i`` is ``5 + i``, which identifies its row in a batch.
    """
    generator = torch.Generator().manual_seed(5)
    examples = []
    for index in range(NUM_EXAMPLES):
        length = 7 + index
        rest = torch.randint(5, vocab_size, (length - 1,), generator=generator).tolist()
        ids = (5 + index, *rest)
        labels = (IGNORE_INDEX,) * PROMPT_LENGTH + ids[PROMPT_LENGTH:]
        examples.append(EncodedExample(input_ids=ids, labels=labels))
    return examples


def _gradient_alone(model: torch.nn.Module, example: EncodedExample) -> dict[str, torch.Tensor]:
    """Return the gradient of one example's loss, computed on that example alone (plain autograd)."""
    input_ids = torch.tensor([example.input_ids])
    labels = torch.tensor([example.labels])
    model.zero_grad(set_to_none=True)
    PerSampleCausalLoss(model)(input_ids, torch.ones_like(input_ids), labels)[0].backward()
    gradients = {
        name: parameter.grad.detach().clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }
    model.zero_grad(set_to_none=True)
    return gradients


def _total_norm(gradients: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in gradients.values()))


def _clipping_norm_between(norms: list[float]) -> float:
    """Return a clipping norm inside the widest gap between two sorted per-sample norms."""
    ordered = sorted(norms)
    low, high = max(itertools.pairwise(ordered), key=lambda pair: pair[1] / pair[0])
    assert high / low > 1.02, f"per-sample norms {ordered} are too close to split"
    return math.sqrt(low * high)


@pytest.mark.parametrize(
    ("build", "vocab_size", "train_head"),
    [
        pytest.param(lambda: _tiny_model(train_head=False), 97, False, id="tiny-lora"),
        pytest.param(lambda: _tiny_model(train_head=True), 97, True, id="tiny-lora-head"),
        pytest.param(_minilm_with_head, 30522, True, id="minilm-lora-head"),
    ],
)
def test_dp_sgd_clips_each_sample(monkeypatch, build, vocab_size, train_head):
    model = build()
    examples = _examples(vocab_size)
    names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    head_names = {name for name in names.values() if "modules_to_save" in name}
    assert bool(head_names) == train_head
    alone = [_gradient_alone(model, example) for example in examples]
    norms = [_total_norm(gradients) for gradients in alone]
    clipping_norm = _clipping_norm_between(norms)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    captured: dict[str, object] = {}
    backward_batch = train_module.backward_batch
    add_noise = DPOptimizer.add_noise

    def backward_spy(loss_module, batch, proximal=None):
        captured["input_ids"] = batch[0].clone()
        return backward_batch(loss_module, batch, proximal)

    def add_noise_spy(self):
        # Called right after clip_and_accumulate: the rows are still the unclipped ones.
        captured["rows"] = {names[id(p)]: p.grad_sample.detach().clone() for p in self.params}
        captured["summed"] = {names[id(p)]: p.summed_grad.detach().clone() for p in self.params}
        add_noise(self)

    monkeypatch.setattr(train_module, "backward_batch", backward_spy)
    monkeypatch.setattr(DPOptimizer, "add_noise", add_noise_spy)
    result = train_local(
        model,
        examples,
        train=TrainConfig(batch_size=NUM_EXAMPLES, optimizer="sgd", learning_rate=LEARNING_RATE),
        privacy=PrivacyConfig(clipping_norm=clipping_norm),
        noise_multiplier=0.0,
        pad_token_id=0,
        seed=0,
        steps=1,
    )
    assert result.steps == 1
    assert result.sample_rate == 1.0
    rows, summed = captured["rows"], captured["summed"]
    assert set(rows) == set(summed) == set(names.values())

    # The example in each row, from its first token.
    order = [int(row[0]) - 5 for row in captured["input_ids"]]
    assert sorted(order) == list(range(NUM_EXAMPLES))

    # (a) Each row is that example's own gradient, for LoRA and head tensors alike.
    for row, index in enumerate(order):
        for name in names.values():
            torch.testing.assert_close(
                rows[name][row],
                alone[index][name],
                rtol=1e-4,
                atol=1e-6,
                msg=lambda m, row=row, name=name: f"row {row}, {name}: {m}",
            )

    # (b) Recover the factor Opacus applied to each row from the clipped sum.
    batch = len(order)
    matrix = torch.cat([rows[name].reshape(batch, -1) for name in names.values()], 1).double()
    total = torch.cat([summed[name].reshape(-1) for name in names.values()]).double()
    factors = torch.linalg.lstsq(matrix.T, total.unsqueeze(1)).solution.squeeze(1)
    residual = float((matrix.T @ factors - total).norm())
    assert residual <= 1e-4 * float(total.norm()), (
        "the clipped sum is not a linear combination of the rows"
    )
    row_norms = [norms[index] for index in order]
    below = [n < clipping_norm for n in row_norms]
    assert any(below)
    assert not all(below)
    for row, (factor, norm) in enumerate(zip(factors.tolist(), row_norms)):
        clipped = abs(factor) * norm
        assert clipped <= clipping_norm * (1 + 1e-4), (row, norm, clipping_norm, factor)
        if norm < clipping_norm:
            assert factor == pytest.approx(1.0, abs=1e-4), (row, norm, clipping_norm)
        else:
            assert clipped == pytest.approx(clipping_norm, rel=1e-4), (row, norm, factor)

    # With no noise, SGD moves each weight by lr times the clipped sum over the batch size.
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            expected = before[name] - LEARNING_RATE * summed[name] / batch
            torch.testing.assert_close(parameter.detach(), expected, rtol=1e-4, atol=1e-6)
