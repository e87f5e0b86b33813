"""Secure mode: CSPRNG samples, DP-SGD noise and Poisson sampling without torchcsprng.

The statistical checks allow 6 standard errors. For a near-Gaussian statistic a correct
implementation then fails a check with probability about 2e-9, while a wrong scale or rate
lands far outside.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer
from tiny_models import tiny_lora_bert
from torch.utils.data import DataLoader

from client import secure_dp
from client.secure_dp import SecureDPOptimizer, SecurePoissonSampler, make_secure
from client.train import EncodedDataset, train_local
from common import secure_rng
from common.config import PrivacyConfig, TrainConfig
from common.text import IGNORE_INDEX, EncodedExample

TOLERANCE_SE = 6.0

# --- samples from the OS CSPRNG ------------------------------------------------------------


def test_uniform_range_and_53_bit_resolution():
    draws = secure_rng.uniform(200_000)
    assert draws.dtype == np.float64
    assert draws.min() >= 0.0
    assert draws.max() < 1.0
    scaled = draws * 2.0**53
    assert np.array_equal(scaled, np.floor(scaled))  # multiples of 2**-53
    # The lowest of the 53 bits is random too: about half the values are odd multiples.
    odd_fraction = float(np.mean(scaled.astype(np.uint64) & np.uint64(1)))
    assert abs(odd_fraction - 0.5) < TOLERANCE_SE * math.sqrt(0.25 / draws.size)
    assert abs(draws.mean() - 0.5) < TOLERANCE_SE * math.sqrt(1 / 12 / draws.size)


def test_draws_differ_between_calls():
    assert not np.array_equal(secure_rng.uniform(8), secure_rng.uniform(8))
    assert not np.array_equal(secure_rng.gaussian(8, 1.0), secure_rng.gaussian(8, 1.0))


def test_empty_and_invalid_sizes():
    assert secure_rng.uniform(0).shape == (0,)
    assert secure_rng.standard_normal(0).shape == (0,)
    assert secure_rng.gaussian(0, 1.0).shape == (0,)
    assert secure_rng.standard_normal(3).shape == (3,)  # odd size: half of a pair unused
    with pytest.raises(ValueError, match="invalid sample size -1"):
        secure_rng.uniform(-1)
    with pytest.raises(ValueError, match="invalid standard deviation -1.0"):
        secure_rng.gaussian(4, -1.0)
    with pytest.raises(ValueError, match="invalid standard deviation nan"):
        secure_rng.gaussian(4, float("nan"))


@pytest.mark.parametrize("std", [1.0, 2.5])
def test_gaussian_mean_std_and_mass(std):
    count = 1_000_000
    draws = secure_rng.gaussian(count, std)
    assert abs(draws.mean()) < TOLERANCE_SE * std / math.sqrt(count)
    # The standard error of a sample standard deviation is about std / sqrt(2 count).
    assert abs(draws.std() - std) < TOLERANCE_SE * std / math.sqrt(2 * count)
    # Mass within one standard deviation: 0.6827 for a Gaussian, 0.5774 for a uniform.
    within = float(np.mean(np.abs(draws) < std))
    expected = math.erf(1 / math.sqrt(2))
    assert abs(within - expected) < TOLERANCE_SE * math.sqrt(expected * (1 - expected) / count)


def test_standard_normal_moments():
    count = 1_000_000
    draws = secure_rng.standard_normal(count)
    assert abs(draws.mean()) < TOLERANCE_SE / math.sqrt(count)
    assert abs(draws.var() - 1.0) < TOLERANCE_SE * math.sqrt(2 / count)
    # Kurtosis 3 (standard error about sqrt(96 / count) for a Gaussian).
    assert abs(np.mean(draws**4) - 3.0) < TOLERANCE_SE * math.sqrt(96 / count)


def test_gaussian_sums_four_independent_draws(monkeypatch):
    sizes = []
    standard_normal = secure_rng.standard_normal

    def spy(size: int) -> np.ndarray:
        sizes.append(size)
        return standard_normal(size)

    monkeypatch.setattr(secure_rng, "standard_normal", spy)
    secure_rng.gaussian(10, 1.0)
    # One call per summand, so no two summands of a sample share a Box-Muller pair.
    assert sizes == [10] * (2 * secure_rng.HARDENING_N)


# --- Poisson sampling ----------------------------------------------------------------------


def test_poisson_batch_size_mean_and_variance():
    num_samples, rate, steps = 200, 0.1, 5000
    sampler = SecurePoissonSampler(num_samples=num_samples, sample_rate=rate, steps=steps)
    batches = list(sampler)
    assert len(batches) == len(sampler) == steps
    sizes = np.array([len(batch) for batch in batches], dtype=np.float64)
    mean, variance = num_samples * rate, num_samples * rate * (1 - rate)
    assert abs(sizes.mean() - mean) < TOLERANCE_SE * math.sqrt(variance / steps)
    # The sample variance of a near-Gaussian count has standard error variance * sqrt(2/steps).
    assert abs(sizes.var(ddof=1) - variance) < TOLERANCE_SE * variance * math.sqrt(2 / steps)
    for batch in batches[:50]:
        assert batch == sorted(set(batch))
        assert all(0 <= index < num_samples for index in batch)

    # Every record is selected at the same rate, the first and the last included.
    selected = np.concatenate([np.array(batch, dtype=np.int64) for batch in batches])
    record_rates = np.bincount(selected, minlength=num_samples) / steps
    record_se = math.sqrt(rate * (1 - rate) / steps)
    assert np.all(np.abs(record_rates - rate) < TOLERANCE_SE * record_se)


def test_poisson_sampler_rejects_invalid_settings():
    with pytest.raises(ValueError, match="invalid sample_rate 0"):
        SecurePoissonSampler(num_samples=4, sample_rate=0, steps=1)
    with pytest.raises(ValueError, match="invalid num_samples 0"):
        SecurePoissonSampler(num_samples=0, sample_rate=0.5, steps=1)
    with pytest.raises(ValueError, match="invalid steps 0"):
        SecurePoissonSampler(num_samples=4, sample_rate=0.5, steps=0)


def _examples(count: int = 12, *, targets: bool = True) -> list[EncodedExample]:
    generator = torch.Generator().manual_seed(3)
    examples = []
    for _ in range(count):
        ids = tuple(int(i) for i in torch.randint(5, 97, (10,), generator=generator))
        labels = (IGNORE_INDEX,) * 4 + ids[4:] if targets else (IGNORE_INDEX,) * len(ids)
        examples.append(EncodedExample(input_ids=ids, labels=labels))
    return examples


def _secure_loader(count: int, batch_size: int) -> tuple[DataLoader, DPDataLoader]:
    dataset = EncodedDataset(_examples(count), pad_token_id=0)
    opacus_loader = DPDataLoader.from_data_loader(DataLoader(dataset, batch_size=batch_size))
    tiny = tiny_lora_bert()
    optimizer = DPOptimizer(
        torch.optim.SGD([p for p in tiny.parameters() if p.requires_grad], lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=batch_size,
    )
    _, loader = make_secure(optimizer, opacus_loader)
    return loader, opacus_loader


def test_secure_loader_keeps_rate_and_empty_batches():
    loader, opacus_loader = _secure_loader(12, batch_size=1)  # q = 1/12, P(empty) ≈ 0.35
    assert isinstance(loader.batch_sampler, SecurePoissonSampler)
    assert loader.batch_sampler.sample_rate == opacus_loader.sample_rate == pytest.approx(1 / 12)
    assert len(loader) == len(opacus_loader) == 12
    sizes = []
    for _ in range(50):
        for input_ids, attention_mask, labels in loader:
            assert input_ids.shape[0] == attention_mask.shape[0] == labels.shape[0]
            assert input_ids.dim() == 2  # an empty batch keeps its (0, width) shape
            assert input_ids.dtype == torch.long
            sizes.append(input_ids.shape[0])
    assert 0 in sizes
    assert max(sizes) > 0


def test_make_secure_rejects_other_optimizers():
    dataset = EncodedDataset(_examples(4), pad_token_id=0)
    loader = DPDataLoader.from_data_loader(DataLoader(dataset, batch_size=2))
    params = [p for p in tiny_lora_bert().parameters() if p.requires_grad]
    per_layer = DPPerLayerOptimizer(
        torch.optim.SGD(params, lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=[1.0] * len(params),
        expected_batch_size=2,
    )
    with pytest.raises(TypeError, match="DPOptimizer only, got DPPerLayerOptimizer"):
        make_secure(per_layer, loader)
    flat = DPOptimizer(
        torch.optim.SGD(params, lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=2,
    )
    with pytest.raises(TypeError, match="single-process DPDataLoader, got DataLoader"):
        make_secure(flat, DataLoader(dataset, batch_size=2))


# --- DP-SGD steps in secure mode -----------------------------------------------------------


def _train(model, examples, *, secure: bool, steps: int, **train_options):
    return train_local(
        model,
        examples,
        train=TrainConfig(batch_size=4, **train_options),
        privacy=PrivacyConfig(secure_mode=secure),
        noise_multiplier=1.0,
        pad_token_id=0,
        seed=0,
        steps=steps,
    )


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_secure_step_adds_noise_of_right_scale():
    # No example has a target token, so every clipped gradient is zero and plain SGD with
    # lr = 1 moves each weight by exactly -noise / expected_batch_size.
    noise_multiplier, clipping_norm = 1.5, 2.0
    model = tiny_lora_bert(random_lora_b=False)
    before = _trainable(model)
    result = train_local(
        model,
        _examples(12, targets=False),
        train=TrainConfig(batch_size=4, optimizer="sgd", learning_rate=1.0),
        privacy=PrivacyConfig(secure_mode=True, clipping_norm=clipping_norm),
        noise_multiplier=noise_multiplier,
        pad_token_id=0,
        seed=0,
        steps=1,
    )
    assert result.secure_mode is True
    after = _trainable(model)
    steps = torch.cat([(before[n] - after[n]).flatten() for n in before]).double()
    assert all(not torch.equal(before[n], after[n]) for n in before)
    # Opacus: q = 1 / ceil(12 / 4) and expected batch size int(12 * q) = 4.
    expected_std = noise_multiplier * clipping_norm / 4
    count = steps.numel()
    assert count > 500
    assert abs(float(steps.mean())) < TOLERANCE_SE * expected_std / math.sqrt(count)
    assert abs(float(steps.std()) - expected_std) < TOLERANCE_SE * expected_std / math.sqrt(
        2 * count
    )


def test_secure_step_uses_secure_optimizer(monkeypatch):
    calls = []
    add_noise = SecureDPOptimizer.add_noise

    def spy(self):
        calls.append(type(self))
        add_noise(self)

    monkeypatch.setattr(SecureDPOptimizer, "add_noise", spy)
    result = _train(tiny_lora_bert(random_lora_b=False), _examples(), secure=True, steps=2)
    assert result.steps == 2
    assert calls == [SecureDPOptimizer, SecureDPOptimizer]


def test_empty_batches_take_noise_steps(monkeypatch):
    # A sampler that selects no record makes every batch empty. Each step must still run
    # and add noise, with no forward pass and so no training loss.
    no_record = types.SimpleNamespace(uniform=np.ones, gaussian=secure_rng.gaussian)
    monkeypatch.setattr(secure_dp, "secure_rng", no_record)
    model = tiny_lora_bert(random_lora_b=False)
    before = _trainable(model)
    result = _train(model, _examples(), secure=True, steps=2)
    assert result.steps == 2
    assert math.isnan(result.train_loss)
    after = _trainable(model)
    assert all(not torch.equal(before[n], after[n]) for n in before)


def test_secure_mode_is_not_seeded():
    first, second = tiny_lora_bert(), tiny_lora_bert()
    _train(first, _examples(), secure=True, steps=2)
    _train(second, _examples(), secure=True, steps=2)
    differ = [
        n for n, p in _trainable(first).items() if not torch.equal(p, _trainable(second)[n])
    ]
    assert differ


def test_non_secure_mode_stays_reproducible():
    first, second = tiny_lora_bert(), tiny_lora_bert()
    result = _train(first, _examples(), secure=False, steps=2)
    _train(second, _examples(), secure=False, steps=2)
    assert result.secure_mode is False
    second_weights = _trainable(second)
    for name, weight in _trainable(first).items():
        assert torch.equal(weight, second_weights[name]), name


# --- production simulation -----------------------------------------------------------------

TINY_CONFIG = """\
seed = 0
[model]
max-new-tokens = 20
[data]
eval-sample = 3
[train]
batch-size = 8
local-epochs = 1.0
"""


@pytest.mark.slow
def test_production_simulation_records_secure_mode(tmp_path, data_dir):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_CONFIG, encoding="utf-8")
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable, "-m", "common.cli", "simulate", "--production",
            "--config", str(config),
            "--data-dir", str(data_dir),
            "--output", str(run_dir),
            "--num-rounds", "1",
            "--num-clients", "2",
            "--max-examples-per-client", "16",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]

    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["production"] is True
    assert privacy["secure_mode"] is True
    assert set(privacy["clients"]) == {"client-000", "client-001"}
    for client in privacy["clients"].values():
        assert client["secure_mode"] is True
        assert client["rounds_joined"] == [1]
        assert client["steps"] == 2

    report = (run_dir / "report.md").read_text()
    assert "- secure mode (cryptographic noise): on" in report
    assert "Secure mode was off" not in report
