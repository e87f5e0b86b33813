"""With ``privacy.production = true`` every DP draw comes from the OS CSPRNG, at the planned scale.

A seeded generator gives the same draws to two objects built with the same seed, so each
test builds two and compares their draws. With production on, the draws must differ and
come from :mod:`common.secure_rng`. With it off, they must be identical. The statistical
checks allow 6 standard errors, as in ``test_secure_rng.py``.

Covered here, and not in ``test_central_dp.py`` or ``test_secure_rng.py``: the server's
advertiser-level update and count noise built from a run config, the clients' noise shares
of the distributed mode, and the Poisson batches that :func:`client.train.train_local` takes
in secure mode. The secure DP-SGD noise scale is checked in ``test_secure_rng.py``.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from tiny_models import tiny_lora_bert

from client import secure_dp
from client import train as train_module
from client.distributed_dp import distributed_vector, noise_generator
from client.train import backward_batch as _backward_batch
from client.train import train_local
from common import secure_rng
from common.config import PrivacyConfig, RunConfig, TrainConfig
from common.secagg.update import COUNT_KEY
from common.text import IGNORE_INDEX, EncodedExample
from server.central_dp import (
    AdvertiserDP,
    NoiseShares,
    RoundSampling,
    clip_update,
    run_noise_parameters,
)

TOLERANCE_SE = 6.0
SEED = 7
Z = 1.3  # advertiser-dp.noise-multiplier
CLIPPING_NORM = 0.5
COUNT_STDDEV = 2.0  # advertiser-dp.clipped-count-stddev, which must exceed Z / 2


def _run_config(*, production: bool, adaptive: bool = False, distributed: bool = False):
    advertiser = {
        "enabled": True,
        "noise-multiplier": Z,
        "clipping-norm": CLIPPING_NORM,
        "accountant": "rdp",
    }
    if adaptive:
        advertiser |= {"adaptive-clipping": True, "clipped-count-stddev": COUNT_STDDEV}
    return RunConfig.from_dict(
        {
            "seed": SEED,
            "privacy": {"production": production},
            "advertiser-dp": advertiser,
            "server": {"weighting": "uniform", "secure-aggregation": distributed},
        }
    )


@pytest.fixture
def csprng_calls(monkeypatch) -> list[tuple[int, float]]:
    """Record ``(size, std)`` of every :func:`common.secure_rng.gaussian` draw."""
    calls: list[tuple[int, float]] = []
    gaussian = secure_rng.gaussian

    def spy(size: int, std: float) -> np.ndarray:
        calls.append((size, std))
        return gaussian(size, std)

    monkeypatch.setattr(secure_rng, "gaussian", spy)
    return calls


def _assert_std(draws: np.ndarray, std: float) -> None:
    """Assert mean 0 and standard deviation ``std``, within 6 standard errors."""
    count = draws.size
    assert abs(float(draws.mean())) < TOLERANCE_SE * std / math.sqrt(count)
    assert abs(float(draws.std()) - std) < TOLERANCE_SE * std / math.sqrt(2 * count)


def _assert_uncorrelated(first: np.ndarray, second: np.ndarray) -> None:
    correlation = float(np.corrcoef(first.ravel(), second.ravel())[0, 1])
    assert abs(correlation) < TOLERANCE_SE / math.sqrt(first.size)


# ---------------------------------------------------------------------------
# Advertiser-level DP on the server (central mode)
# ---------------------------------------------------------------------------


def test_advertiser_update_noise_secure(csprng_calls):
    size, num_sampled = 200_000, 5
    rng = np.random.default_rng(1)
    deltas = [
        {"w": rng.standard_normal(size) * 0.01},  # norm about 4.5: clipped to C
        {"w": rng.standard_normal(size) * 1e-5},  # norm about 0.004: kept
    ]
    mean = sum(clip_update(d, clipping_norm=CLIPPING_NORM)[0]["w"] for d in deltas) / num_sampled
    sampling = RoundSampling(1, num_sampled, 10)
    stddev = Z * CLIPPING_NORM / num_sampled

    def noise(cfg: RunConfig) -> np.ndarray:
        dp = AdvertiserDP.from_run_config(cfg)
        assert dp is not None
        assert dp.secure_mode is cfg.privacy.production
        return dp.privatize(deltas, sampling)["w"] - mean

    seeded = [noise(_run_config(production=False)) for _ in range(2)]
    assert csprng_calls == []
    np.testing.assert_array_equal(seeded[0], seeded[1])

    secure = [noise(_run_config(production=True)) for _ in range(2)]
    assert csprng_calls == [(size, pytest.approx(stddev))] * 2
    assert not np.array_equal(secure[0], secure[1])
    _assert_uncorrelated(secure[0], secure[1])
    _assert_uncorrelated(secure[0], seeded[0])
    for draws in (*secure, seeded[0]):
        _assert_std(draws, stddev)


def test_advertiser_count_noise_secure(monkeypatch, csprng_calls):
    # Zero updates are always within C, so each round's bit count is exactly len(deltas)
    # and the released fraction is 1 + noise / len(deltas). The accountant is not under
    # test here and takes most of a round's time, so it is skipped.
    monkeypatch.setattr(AdvertiserDP, "epsilon", lambda self: 0.0)
    deltas = [{"w": np.zeros(2)}] * 4
    rounds = 2000

    def count_noise(cfg: RunConfig, num_rounds: int) -> np.ndarray:
        dp = AdvertiserDP.from_run_config(cfg)
        assert dp is not None
        assert dp.clipped_count_stddev == COUNT_STDDEV
        for server_round in range(1, num_rounds + 1):
            dp.privatize(deltas, RoundSampling(server_round, 4, 10))
        fractions = np.array([release.unclipped_fraction for release in dp.releases])
        return (fractions - 1.0) * len(deltas)

    seeded = [count_noise(_run_config(production=False, adaptive=True), 3) for _ in range(2)]
    assert csprng_calls == []
    np.testing.assert_array_equal(seeded[0], seeded[1])

    first = count_noise(_run_config(production=True, adaptive=True), 3)
    again = count_noise(_run_config(production=True, adaptive=True), 3)
    assert not np.array_equal(first, again)
    # Each round draws the update noise (2 coordinates) and then the count noise (1).
    count_calls = [call for call in csprng_calls if call[0] == 1]
    assert len(count_calls) == 6
    assert all(std == pytest.approx(COUNT_STDDEV) for _, std in count_calls)

    _assert_std(count_noise(_run_config(production=True, adaptive=True), rounds), COUNT_STDDEV)


# ---------------------------------------------------------------------------
# Advertiser-level DP under secure aggregation: the clients' noise shares
# ---------------------------------------------------------------------------


def test_distributed_noise_shares_secure(csprng_calls):
    size, min_survivors = 200_000, 4
    secure_cfg = _run_config(production=True, adaptive=True, distributed=True)
    seeded_cfg = _run_config(production=False, adaptive=True, distributed=True)
    shares = NoiseShares.for_round(
        run_noise_parameters(secure_cfg), clipping_norm=CLIPPING_NORM, min_survivors=min_survivors
    )
    assert shares.update_stddev > 0
    assert shares.count_stddev == pytest.approx(COUNT_STDDEV / math.sqrt(min_survivors))
    assert noise_generator(secure_cfg, "client-000", 1, 1) is None
    delta = {"w": np.zeros(size)}  # within C: the vector is the noise share, the bit is 1

    def vector(
        cfg: RunConfig, client_id: str = "client-000", update=delta
    ) -> dict[str, np.ndarray]:
        return distributed_vector(update, cfg, shares, client_id=client_id, server_round=1)[0]

    seeded = [vector(seeded_cfg) for _ in range(2)]
    assert csprng_calls == []
    for name in seeded[0]:
        np.testing.assert_array_equal(seeded[0][name], seeded[1][name])

    secure = [vector(secure_cfg) for _ in range(2)]
    one_vector = [
        (size, pytest.approx(shares.update_stddev)),
        (1, pytest.approx(shares.count_stddev)),
    ]
    assert csprng_calls == one_vector * 2
    assert not np.array_equal(secure[0]["w"], secure[1]["w"])
    _assert_uncorrelated(secure[0]["w"], secure[1]["w"])
    _assert_uncorrelated(secure[0]["w"], seeded[0]["w"])
    _assert_std(secure[0]["w"], shares.update_stddev)

    # The noised centred bit of many clients: 1/2 plus count noise of the share's stddev.
    counts = np.array(
        [
            float(vector(secure_cfg, f"client-{i:04d}", {"w": np.zeros(2)})[COUNT_KEY][0])
            for i in range(2000)
        ]
    )
    _assert_std(counts - 0.5, shares.count_stddev)


# ---------------------------------------------------------------------------
# Record-level DP-SGD: the Poisson batches of train_local
# ---------------------------------------------------------------------------

NUM_RECORDS = 12
BATCH_SIZE = 4  # Opacus' sample rate 1 / ceil(12 / 4) = 1 / 3
RECORD_STEPS = 40


def _records() -> list[EncodedExample]:
    """Build records whose first token is 5 plus their index, which identifies them in a batch."""
    generator = torch.Generator().manual_seed(3)
    records = []
    for index in range(NUM_RECORDS):
        rest = torch.randint(5, 97, (9,), generator=generator).tolist()
        ids = (5 + index, *rest)
        records.append(EncodedExample(input_ids=ids, labels=(IGNORE_INDEX,) * 4 + ids[4:]))
    return records


def _batches(monkeypatch, *, production: bool) -> list[tuple[int, ...]]:
    """Train ``RECORD_STEPS`` DP-SGD steps and return the record indices of each step's batch."""
    batches: list[tuple[int, ...]] = []

    def spy(loss_module, batch, proximal=None):
        batches.append(tuple(sorted(int(row[0]) - 5 for row in batch[0])))
        return _backward_batch(loss_module, batch, proximal)

    monkeypatch.setattr(train_module, "backward_batch", spy)
    result = train_local(
        tiny_lora_bert(),
        _records(),
        train=TrainConfig(batch_size=BATCH_SIZE),
        privacy=PrivacyConfig(production=production),
        noise_multiplier=1.0,
        pad_token_id=0,
        seed=SEED,
        steps=RECORD_STEPS,
    )
    assert result.secure_mode is production
    assert len(batches) == RECORD_STEPS
    return batches


def test_record_poisson_batches_secure(monkeypatch, csprng_calls):
    # Record the sampler's uniform draws. Its Gaussian draws still reach csprng_calls.
    uniform_sizes: list[int] = []

    def uniform_spy(size: int) -> np.ndarray:
        uniform_sizes.append(size)
        return secure_rng.uniform(size)

    sampler_rng = types.SimpleNamespace(
        uniform=uniform_spy, gaussian=lambda size, std: secure_rng.gaussian(size, std)
    )
    monkeypatch.setattr(secure_dp, "secure_rng", sampler_rng)

    seeded = [_batches(monkeypatch, production=False) for _ in range(2)]
    assert uniform_sizes == []
    assert csprng_calls == []
    assert seeded[0] == seeded[1]

    secure = [_batches(monkeypatch, production=True) for _ in range(2)]
    assert secure[0] != secure[1]
    # One Bernoulli draw per record and step, and the step's noise, from the CSPRNG.
    assert uniform_sizes == [NUM_RECORDS] * (2 * RECORD_STEPS)
    trainable = sum(p.requires_grad for p in tiny_lora_bert().parameters())
    assert len(csprng_calls) == 2 * RECORD_STEPS * trainable
    # The noise multiplier and the default clipping norm are both 1.
    assert all(std == pytest.approx(1.0) for _, std in csprng_calls)

    # Each record joins a batch with probability 1/3 (6 standard errors of a binomial).
    draws = 2 * RECORD_STEPS * NUM_RECORDS
    selected = sum(len(batch) for run in secure for batch in run)
    rate = 1 / 3
    assert abs(selected - rate * draws) < TOLERANCE_SE * math.sqrt(draws * rate * (1 - rate))
