"""Advertiser-level DP on the server: clipping, noise, adaptive clipping, accounting, config."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import create_accountant

from common.config import AdvertiserDPConfig, ConfigError, RunConfig
from server.aggregation import ClientUpdate, GlobalAdapter
from server.central_dp import (
    AdvertiserDP,
    RoundSampling,
    adapt_clipping_norm,
    add_noise_share,
    calibrate_noise_multiplier,
    clip_update,
    gaussian_noise,
    noise_share_stddev,
    update_noise_multiplier,
)

# Relative tolerance for a sample standard deviation over n >= 200_000 Gaussian draws:
# its standard error is about 1 / sqrt(2 n) = 0.16 %, so 1 % is more than 6 standard errors.
STD_TOLERANCE = 0.01


def advertiser_dp(**overrides) -> AdvertiserDP:
    values = {"enabled": True, "noise_multiplier": 1.0, "clipping_norm": 1.0, **overrides}
    return AdvertiserDP(
        AdvertiserDPConfig(**values),
        num_rounds=10,
        planned_num_sampled=4,
        planned_sample_rate=0.4,
        seed=0,
        secure_mode=False,
    )


def scaled(vector: np.ndarray, norm: float) -> dict[str, np.ndarray]:
    """Split ``vector`` scaled to L2 norm ``norm`` into two named tensors."""
    vector = vector * (norm / np.linalg.norm(vector))
    return {"a": vector[:6].reshape(2, 3), "b": vector[6:]}


def norm_of(arrays) -> float:
    return math.sqrt(sum(float(np.sum(np.square(value))) for value in arrays.values()))


# ---------------------------------------------------------------------------
# Clipping
# ---------------------------------------------------------------------------


def test_clip_scales_large_update_to_norm():
    delta = scaled(np.arange(1.0, 11.0), 5.0)
    clipped, within = clip_update(delta, clipping_norm=2.0)
    assert not within
    assert norm_of(clipped) == pytest.approx(2.0, rel=1e-12)
    for name in delta:  # same direction
        np.testing.assert_allclose(clipped[name], delta[name] * 0.4, rtol=1e-12)


def test_clip_leaves_small_update_alone():
    delta = scaled(np.arange(1.0, 11.0), 1.5)
    clipped, within = clip_update(delta, clipping_norm=2.0)
    assert within
    for name in delta:
        np.testing.assert_array_equal(clipped[name], delta[name])


def test_clip_keeps_zero_update():
    clipped, within = clip_update({"a": np.zeros(4)}, clipping_norm=1.0)
    assert within
    np.testing.assert_array_equal(clipped["a"], np.zeros(4))


# ---------------------------------------------------------------------------
# Noise on the aggregate
# ---------------------------------------------------------------------------


def test_noise_on_mean_has_stddev_z_c_over_m():
    dp = advertiser_dp(noise_multiplier=1.3, clipping_norm=0.5)
    rng = np.random.default_rng(1)
    size = 200_000
    deltas = [
        {"w": rng.standard_normal(size) * 0.01},  # norm about 4.5: clipped to 0.5
        {"w": rng.standard_normal(size) * 1e-5},  # norm about 0.004: kept
        {"w": np.zeros(size)},
    ]
    num_sampled = 5  # two sampled clients sent nothing valid and count as zero
    noised = dp.privatize(deltas, RoundSampling(1, num_sampled, 12))

    expected_mean = sum(clip_update(d, clipping_norm=0.5)[0]["w"] for d in deltas) / num_sampled
    residual = noised["w"] - expected_mean
    stddev = 1.3 * 0.5 / num_sampled
    assert np.std(residual) == pytest.approx(stddev, rel=STD_TOLERANCE)
    assert abs(np.mean(residual)) < 5 * stddev / math.sqrt(size)
    assert dp.releases[0].noise_stddev == pytest.approx(stddev)


def test_seeded_noise_repeats_per_round():
    deltas = [{"w": np.ones(50)}]
    first = advertiser_dp().privatize(deltas, RoundSampling(3, 2, 4))
    again = advertiser_dp().privatize(deltas, RoundSampling(3, 2, 4))
    other = advertiser_dp().privatize(deltas, RoundSampling(4, 2, 4))
    np.testing.assert_array_equal(first["w"], again["w"])
    assert not np.allclose(first["w"], other["w"])


def test_secure_noise_statistics():
    draws = gaussian_noise((400, 500), 2.5, rng=None)
    assert draws.shape == (400, 500)
    assert np.std(draws) == pytest.approx(2.5, rel=STD_TOLERANCE)
    assert abs(np.mean(draws)) < 5 * 2.5 / math.sqrt(draws.size)
    # Fourth moment of a Gaussian: 3 sigma^4 (tolerance about 6 standard errors).
    assert np.mean(draws**4) / np.std(draws) ** 4 == pytest.approx(3.0, abs=0.06)


def test_more_updates_than_sampled_rejected():
    with pytest.raises(ValueError, match="at most one update"):
        advertiser_dp().privatize([{"w": np.ones(2)}] * 3, RoundSampling(1, 2, 4))


# ---------------------------------------------------------------------------
# Distributed noise shares (for secure aggregation)
# ---------------------------------------------------------------------------


def test_noise_share_stddev_formula():
    share = noise_share_stddev(noise_multiplier=1.2, clipping_norm=0.5, num_sampled=9)
    assert share == pytest.approx(1.2 * 0.5 / 3)


def test_noise_shares_sum_to_central_noise():
    z, clipping_norm, num_sampled, size = 1.1, 0.8, 6, 200_000
    rng = np.random.default_rng(7)
    clipped = [{"w": np.full(size, 0.001 * i)} for i in range(num_sampled)]
    shares = [
        add_noise_share(
            update,
            noise_multiplier=z,
            clipping_norm=clipping_norm,
            num_sampled=num_sampled,
            rng=rng,
        )
        for update in clipped
    ]
    one_share = shares[0]["w"] - clipped[0]["w"]
    assert np.std(one_share) == pytest.approx(
        z * clipping_norm / math.sqrt(num_sampled), rel=STD_TOLERANCE
    )
    mean = sum(share["w"] for share in shares) / num_sampled
    residual = mean - sum(update["w"] for update in clipped) / num_sampled
    assert np.std(residual) == pytest.approx(z * clipping_norm / num_sampled, rel=STD_TOLERANCE)
    assert abs(np.mean(residual)) < 5 * z * clipping_norm / num_sampled / math.sqrt(size)


# ---------------------------------------------------------------------------
# Adaptive clipping
# ---------------------------------------------------------------------------


def test_adapt_clipping_norm_formula():
    assert adapt_clipping_norm(
        2.0, unclipped_fraction=0.75, target_quantile=0.5, learning_rate=0.2
    ) == pytest.approx(2.0 * math.exp(-0.2 * 0.25))
    # All updates clipped: the norm grows. None clipped: it shrinks.
    settings = {"target_quantile": 0.5, "learning_rate": 0.2}
    assert adapt_clipping_norm(1.0, unclipped_fraction=0.0, **settings) > 1.0
    assert adapt_clipping_norm(1.0, unclipped_fraction=1.0, **settings) < 1.0


def test_adaptive_round_follows_formula_on_built_norms():
    # Norms 0.5, 0.9 (within C = 1) and 2, 3 (clipped): 2 of 4 bits set.
    dp = advertiser_dp(
        noise_multiplier=0.05,
        adaptive_clipping=True,
        target_quantile=0.8,
        clip_learning_rate=0.3,
        clipped_count_stddev=0.05,
    )
    rng = np.random.default_rng(3)
    deltas = [scaled(rng.standard_normal(10), norm) for norm in (0.5, 2.0, 0.9, 3.0)]
    dp.privatize(deltas, RoundSampling(1, 4, 10))

    release = dp.releases[0]
    assert release.clipping_norm == 1.0
    # The released fraction is 2/4 plus count noise of stddev 0.05 / 4 (5 stddevs allowed).
    assert release.unclipped_fraction == pytest.approx(0.5, abs=5 * 0.05 / 4)
    expected = 1.0 * math.exp(-0.3 * (release.unclipped_fraction - 0.8))
    assert dp.clipping_norm == pytest.approx(expected, rel=1e-12)
    assert dp.clipping_norm > 1.0  # fewer updates than the 0.8 quantile were within C

    # The next round clips at the new norm.
    dp.privatize(deltas, RoundSampling(2, 4, 10))
    assert dp.releases[1].clipping_norm == pytest.approx(expected, rel=1e-12)


def test_adaptive_noise_split_matches_andrew_et_al():
    z, sigma_b = 1.0, 2.0
    expected = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
    assert update_noise_multiplier(z, clipped_count_stddev=sigma_b) == pytest.approx(expected)
    dp = advertiser_dp(noise_multiplier=z, adaptive_clipping=True, clipped_count_stddev=sigma_b)
    assert dp.update_noise_multiplier == pytest.approx(expected)
    assert dp.noise_multiplier == z  # the accountant is charged the combined multiplier


def test_adaptive_with_too_little_count_noise_is_config_error():
    # Default sigma_b = 4 sampled / 20 = 0.2 cannot carry z = 1 (needs sigma_b > 0.5).
    with pytest.raises(ConfigError, match="advertiser-dp.clipped-count-stddev"):
        advertiser_dp(noise_multiplier=1.0, adaptive_clipping=True)


# ---------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_noise_round_trips_epsilon(accountant):
    target, delta, sample_rate, rounds = 3.0, 1e-5, 0.25, 40
    z = calibrate_noise_multiplier(
        target_epsilon=target,
        target_delta=delta,
        sample_rate=sample_rate,
        num_rounds=rounds,
        accountant=accountant,
    )
    composed = create_accountant(mechanism=accountant)
    composed.history = [(z, sample_rate, rounds)]
    epsilon = composed.get_epsilon(delta=delta)
    assert epsilon <= target
    assert epsilon == pytest.approx(target, rel=0.01)


def test_prv_is_tighter_than_rdp():
    rdp, prv = create_accountant(mechanism="rdp"), create_accountant(mechanism="prv")
    rdp.history = prv.history = [(1.2, 0.2, 30)]
    assert prv.get_epsilon(delta=1e-5) < rdp.get_epsilon(delta=1e-5)


def test_run_spends_target_epsilon_over_planned_rounds():
    dp = AdvertiserDP(
        AdvertiserDPConfig(enabled=True, target_epsilon=4.0, target_delta=1e-5),
        num_rounds=6,
        planned_num_sampled=2,
        planned_sample_rate=0.5,
        seed=0,
        secure_mode=False,
    )
    for server_round in range(1, 7):
        dp.privatize([{"w": np.ones(3)}], RoundSampling(server_round, 2, 4))
    assert dp.history == [(dp.noise_multiplier, 0.5, 6)]
    assert dp.epsilon() == pytest.approx(4.0, rel=0.01)
    assert dp.epsilon() <= 4.0


def test_state_dict_round_trip():
    dp = advertiser_dp(noise_multiplier=0.5, adaptive_clipping=True, clipped_count_stddev=1.0)
    for server_round in (1, 2):
        dp.privatize([{"w": np.full(4, 3.0)}], RoundSampling(server_round, 2, 5))
    restored = advertiser_dp(noise_multiplier=0.5, adaptive_clipping=True, clipped_count_stddev=1.0)
    restored.load_state_dict(dp.state_dict())
    assert restored.clipping_norm == dp.clipping_norm != 1.0
    assert restored.history == dp.history
    assert restored.releases == dp.releases
    assert restored.epsilon() == dp.epsilon()
    other = advertiser_dp(noise_multiplier=0.7)
    with pytest.raises(ValueError, match="noise_multiplier"):
        other.load_state_dict(dp.state_dict())


# ---------------------------------------------------------------------------
# Config and weighting
# ---------------------------------------------------------------------------


def dp_run_config(**server) -> RunConfig:
    return RunConfig.from_dict(
        {
            "advertiser-dp": {"enabled": True, "noise-multiplier": 1.0},
            "server": {"weighting": "uniform", **server},
        }
    )


@pytest.mark.parametrize(
    ("server", "key"),
    [
        ({"weighting": "examples"}, "server.weighting"),
        ({"robust": "median"}, "server.robust"),
        ({"robust": "trimmed-mean"}, "server.robust"),
        ({"norm-bound": 2.0}, "server.norm-bound"),
    ],
)
def test_unsound_combination_is_config_error(server, key):
    with pytest.raises(ConfigError, match=key):
        dp_run_config(**server)


def test_replace_cannot_turn_weighting_back():
    cfg = dp_run_config()
    with pytest.raises(ConfigError, match="server.weighting"):
        cfg.replace(server={"weighting": "examples"})


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"enabled": True}, "advertiser-dp.noise-multiplier"),
        ({"enabled": True, "noise-multiplier": 1.0, "target-epsilon": 2.0}, "noise-multiplier"),
        ({"clipping-norm": 0.0}, "advertiser-dp.clipping-norm"),
        ({"target-quantile": 1.0}, "advertiser-dp.target-quantile"),
        ({"clip-learning-rate": 0.0}, "advertiser-dp.clip-learning-rate"),
        ({"clipped-count-stddev": -1.0}, "advertiser-dp.clipped-count-stddev"),
        ({"target-delta": 0.0}, "advertiser-dp.target-delta"),
        ({"accountant": "gdp"}, "advertiser-dp.accountant"),
    ],
)
def test_invalid_advertiser_dp_value_is_named(values, key):
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_dict({"advertiser-dp": values, "server": {"weighting": "uniform"}})


def test_config_round_trips_through_flat_keys():
    cfg = dp_run_config()
    assert cfg.to_flat()["advertiser-dp.noise-multiplier"] == 1.0
    assert RunConfig.from_dict(cfg.to_flat()) == cfg


def test_example_counts_do_not_change_dp_aggregate():
    cfg = dp_run_config(**{"min-train-nodes": 1})
    initial = {"w": np.zeros(8, np.float32)}
    rng = np.random.default_rng(0)
    arrays = [{"w": rng.standard_normal(8).astype(np.float32)} for _ in range(3)]
    states = []
    for counts in ((1, 1, 1), (5, 500, 50_000)):
        strategy = GlobalAdapter(initial, cfg)
        updates = [
            ClientUpdate(f"client-{i}", arrays[i], num_examples=count, rank=4)
            for i, count in enumerate(counts)
        ]
        outcome = strategy.aggregate(updates, min_updates=1, sampling=RoundSampling(1, 3, 3))
        assert outcome.applied
        states.append(strategy.state["w"])
    np.testing.assert_array_equal(states[0], states[1])
