"""Tests for the secure aggregation primitives: fixed point, Shamir sharing, masks."""

from __future__ import annotations

import itertools
import random
import secrets

import numpy as np
import pytest

from common.secagg import fixed_point, masking, shamir
from common.secagg.fixed_point import (
    FixedPointConfig,
    add_mod,
    decode_sum,
    encode,
    flatten_update,
    layout_of,
    unflatten_update,
)

# --- fixed point --------------------------------------------------------------------------


def test_quantization_bits_cannot_overflow():
    for modulus_bits, max_clients in [(32, 1), (32, 10), (32, 16), (32, 17), (16, 100)]:
        config = FixedPointConfig(
            clipping_range=1.0, max_clients=max_clients, modulus_bits=modulus_bits
        )
        assert max_clients * (2**config.bits - 1) <= 2**modulus_bits - 1
        # One more bit would overflow.
        assert max_clients * (2 ** (config.bits + 1) - 1) > 2**modulus_bits - 1
    assert FixedPointConfig(clipping_range=1.0, max_clients=16).bits == 28
    assert FixedPointConfig(clipping_range=1.0, max_clients=2, modulus_bits=64).bits == 48


def test_fixed_point_config_errors():
    with pytest.raises(ValueError, match="clipping_range"):
        FixedPointConfig(clipping_range=0.0, max_clients=2)
    with pytest.raises(ValueError, match="clipping_range"):
        FixedPointConfig(clipping_range=float("inf"), max_clients=2)
    with pytest.raises(ValueError, match="modulus_bits"):
        FixedPointConfig(clipping_range=1.0, max_clients=2, modulus_bits=65)
    with pytest.raises(ValueError, match="quantization_bits"):
        FixedPointConfig(clipping_range=1.0, max_clients=16, quantization_bits=29)
    with pytest.raises(ValueError, match="Increase modulus_bits"):
        FixedPointConfig(clipping_range=1.0, max_clients=2**9, modulus_bits=8)


@pytest.mark.parametrize("modulus_bits, quantization_bits", [(32, None), (16, 8), (64, None)])
def test_encode_round_trip_within_half_step(modulus_bits, quantization_bits):
    config = FixedPointConfig(
        clipping_range=0.5,
        max_clients=4,
        modulus_bits=modulus_bits,
        quantization_bits=quantization_bits,
    )
    rng = np.random.default_rng(0)
    values = rng.uniform(-0.5, 0.5, size=5000)
    values[:3] = [-0.5, 0.5, 0.0]  # both ends of the range and the midpoint
    encoded, num_clipped = encode(values, config)

    assert num_clipped == 0
    assert encoded.dtype == config.dtype
    assert encoded.max() <= 2**config.bits - 1
    decoded = decode_sum(encoded, 1, config)
    assert np.max(np.abs(decoded - values)) <= config.error_bound(1)
    # The grid error itself reaches close to step / 2, so the bound is not loose.
    assert np.max(np.abs(decoded - values)) > 0.4 * config.step


def test_decoded_sum_within_n_half_steps():
    config = FixedPointConfig(clipping_range=1.0, max_clients=10, quantization_bits=12)
    rng = np.random.default_rng(1)
    updates = [rng.uniform(-1.0, 1.0, size=2000) for _ in range(10)]
    total = np.zeros(2000, dtype=config.dtype)
    for update in updates:
        encoded, _ = encode(update, config)
        total = add_mod(total, encoded, config)

    decoded = decode_sum(total, 10, config)
    error = np.abs(decoded - np.sum(updates, axis=0))
    assert np.max(error) <= 10 * config.step / 2 + 1e-12
    assert np.max(error) <= config.error_bound(10)
    # A one-client bound would be violated: errors really add up across clients.
    assert np.max(error) > config.step / 2


def test_full_range_sum_does_not_overflow():
    config = FixedPointConfig(clipping_range=2.0, max_clients=16)
    top = np.full(3, 2.0)
    total = np.zeros(3, dtype=config.dtype)
    for _ in range(16):
        total = add_mod(total, encode(top, config)[0], config)
    np.testing.assert_allclose(decode_sum(total, 16, config), 32.0, atol=config.error_bound(16))
    bottom_total = np.zeros(3, dtype=config.dtype)
    for _ in range(16):
        bottom_total = add_mod(bottom_total, encode(-top, config)[0], config)
    np.testing.assert_allclose(
        decode_sum(bottom_total, 16, config), -32.0, atol=config.error_bound(16)
    )


def test_encode_counts_clipped_values():
    config = FixedPointConfig(clipping_range=1.0, max_clients=2)
    values = np.array([-3.0, -1.0, -0.25, 0.0, 1.0, 1.0000001, 7.5], dtype=np.float32)
    encoded, num_clipped = encode(values, config)
    assert num_clipped == 3
    decoded = decode_sum(encoded, 1, config)
    np.testing.assert_allclose(decoded, np.clip(values, -1.0, 1.0), atol=config.error_bound(1))


def test_encode_rejects_nan():
    config = FixedPointConfig(clipping_range=1.0, max_clients=2)
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        encode(np.array([0.1, np.nan]), config)


def test_decode_sum_rejects_too_many_clients():
    config = FixedPointConfig(clipping_range=1.0, max_clients=3)
    with pytest.raises(ValueError, match="num_clients=4"):
        decode_sum(np.zeros(2, dtype=np.uint32), 4, config)


def test_flatten_unflatten_round_trip():
    update = {
        "layer.1.lora_B": np.arange(6, dtype=np.float32).reshape(3, 2),
        "layer.0.lora_A": np.arange(4, dtype=np.float32).reshape(2, 2) + 10,
    }
    layout = layout_of(update)
    assert layout == (("layer.0.lora_A", (2, 2)), ("layer.1.lora_B", (3, 2)))
    vector = flatten_update(update, layout)
    np.testing.assert_array_equal(vector[:4], [10, 11, 12, 13])
    restored = unflatten_update(vector, layout)
    for name, array in update.items():
        np.testing.assert_array_equal(restored[name], array)
        assert restored[name].shape == array.shape


def test_flatten_rejects_mismatched_update():
    layout = (("a", (2,)), ("b", (3,)))
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        flatten_update({"a": np.zeros(2)}, layout)
    with pytest.raises(ValueError, match="has shape"):
        flatten_update({"a": np.zeros(2), "b": np.zeros(4)}, layout)


# --- Shamir ---------------------------------------------------------------------------


def _is_probable_prime(n: int) -> bool:
    # Miller-Rabin with the first 12 prime bases plus random ones.
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    bases = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]
    bases += [random.Random(7).randrange(2, n - 1) for _ in range(20)]
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def test_shamir_prime_is_prime_above_2_256():
    assert shamir.PRIME > 2**256
    assert _is_probable_prime(shamir.PRIME)


@pytest.mark.parametrize("secret_length", [1, 31, 32, 33, 70])
def test_any_threshold_shares_recover_secret(secret_length):
    secret = secrets.token_bytes(secret_length)
    shares = shamir.split(secret, threshold=3, num_shares=5)
    assert [index for index, _ in shares] == [1, 2, 3, 4, 5]
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine(list(subset)) == secret
    assert shamir.combine(shares) == secret


def test_secret_with_leading_zero_bytes():
    secret = bytes(5) + b"\x01" + bytes(40)
    shares = shamir.split(secret, threshold=2, num_shares=3)
    assert shamir.combine(shares[1:]) == secret


def test_fewer_than_threshold_shares_reveal_nothing():
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, threshold=4, num_shares=6)
    with pytest.raises(shamir.ShamirError, match="threshold is 4"):
        shamir.combine(shares[:3])

    # Interpolating 3 of the points directly gives an unrelated value.
    points = [(index, int.from_bytes(share[6:39], "big")) for index, share in shares[:3]]
    guess = shamir.interpolate_at_zero(points)
    assert guess != int.from_bytes(secret, "big")

    # Perfect secrecy: the same 3 shares fit a degree-3 polynomial for any other secret.
    other = int.from_bytes(secrets.token_bytes(32), "big")
    fitted = points + [(0, other)]
    # The polynomial through (0, other) and the 3 points evaluated at x=4 gives a 4th
    # share; with it, the 4 shares recover `other`, not the real secret.
    x_new = 4
    value = 0
    for i, (x_i, y_i) in enumerate(fitted):
        term = y_i
        for j, (x_j, _) in enumerate(fitted):
            if j != i:
                term = term * (x_new - x_j) * pow(x_i - x_j, -1, shamir.PRIME) % shamir.PRIME
        value = (value + term) % shamir.PRIME
    forged = shares[:3] + [(x_new, shares[0][1][:6] + value.to_bytes(33, "big"))]
    assert shamir.combine(forged) == other.to_bytes(32, "big")


def test_combine_errors():
    shares = shamir.split(b"secret", threshold=2, num_shares=3)
    with pytest.raises(shamir.ShamirError, match="duplicate share indices"):
        shamir.combine([shares[0], shares[0]])
    with pytest.raises(shamir.ShamirError, match="empty"):
        shamir.combine([])
    with pytest.raises(shamir.ShamirError, match="out of range"):
        shamir.combine([(0, shares[0][1]), shares[1]])
    other = shamir.split(b"another secret", threshold=2, num_shares=3)
    with pytest.raises(shamir.ShamirError, match="different splits"):
        shamir.combine([shares[0], other[1]])


def test_split_errors():
    with pytest.raises(shamir.ShamirError, match="threshold=4"):
        shamir.split(b"x", threshold=4, num_shares=3)
    with pytest.raises(shamir.ShamirError, match="threshold=0"):
        shamir.split(b"x", threshold=0, num_shares=3)
    with pytest.raises(shamir.ShamirError, match="empty"):
        shamir.split(b"", threshold=1, num_shares=3)
    with pytest.raises(TypeError, match="str"):
        shamir.split("text", threshold=1, num_shares=3)  # type: ignore[arg-type]


def test_split_with_seeded_rng_is_reproducible():
    first = shamir.split(b"seed", threshold=2, num_shares=3, rng=random.Random(5))
    second = shamir.split(b"seed", threshold=2, num_shares=3, rng=random.Random(5))
    assert first == second
    assert shamir.split(b"seed", threshold=2, num_shares=3) != first


# --- masks and key agreement ------------------------------------------------------------


def test_pairwise_masks_cancel_in_sum():
    config = FixedPointConfig(clipping_range=1.0, max_clients=6)
    session_id = secrets.token_bytes(16)
    keys = {u: masking.generate_key_pair() for u in range(6)}
    length = 1000
    total = np.zeros(length, dtype=config.dtype)
    for u, (private_key, _) in keys.items():
        for v, (_, peer_public) in keys.items():
            if u == v:
                continue
            seed = masking.pairwise_seed(
                private_key, peer_public, session_id=session_id, own_id=u, peer_id=v
            )
            mask = masking.pairwise_mask(seed, length, config, own_id=u, peer_id=v)
            assert mask.any()
            total = add_mod(total, mask, config)
    assert not total.any()


def test_pairwise_seed_is_symmetric_and_session_bound():
    session_id = secrets.token_bytes(16)
    sk_u, pk_u = masking.generate_key_pair()
    sk_v, pk_v = masking.generate_key_pair()
    seed_uv = masking.pairwise_seed(sk_u, pk_v, session_id=session_id, own_id=3, peer_id=8)
    seed_vu = masking.pairwise_seed(sk_v, pk_u, session_id=session_id, own_id=8, peer_id=3)
    assert seed_uv == seed_vu
    other_session = masking.pairwise_seed(
        sk_u, pk_v, session_id=secrets.token_bytes(16), own_id=3, peer_id=8
    )
    assert other_session != seed_uv
    # A private key survives the byte round trip used for secret sharing.
    restored = masking.private_key_from_bytes(masking.private_key_to_bytes(sk_u))
    assert (
        masking.pairwise_seed(restored, pk_v, session_id=session_id, own_id=3, peer_id=8) == seed_uv
    )


def test_expand_mask_deterministic_and_uniform():
    config = FixedPointConfig(clipping_range=1.0, max_clients=4)
    key = secrets.token_bytes(32)
    mask = masking.expand_mask(key, 50_000, config)
    np.testing.assert_array_equal(mask, masking.expand_mask(key, 50_000, config))
    assert mask.dtype == np.uint32
    # Each of the 32 bits is set in about half the words (binomial sd ~ 0.0022).
    bits = (mask[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    assert np.all(np.abs(bits.mean(axis=0) - 0.5) < 0.015)
    assert not np.array_equal(mask, masking.expand_mask(secrets.token_bytes(32), 50_000, config))


def test_expand_mask_respects_small_modulus():
    config = FixedPointConfig(clipping_range=1.0, max_clients=2, modulus_bits=12)
    mask = masking.expand_mask(secrets.token_bytes(32), 10_000, config)
    assert mask.max() < 2**12
    assert mask.max() > 2**11


def test_agree_rejects_low_order_point():
    private_key, _ = masking.generate_key_pair()
    with pytest.raises(ValueError, match="peer's public key is invalid"):
        masking.agree(private_key, bytes(32))


def test_share_encryption_round_trip_and_tamper():
    session_id = secrets.token_bytes(16)
    sk_u, pk_u = masking.generate_key_pair()
    sk_v, pk_v = masking.generate_key_pair()
    key_u = masking.share_encryption_key(sk_u, pk_v, session_id=session_id, own_id=1, peer_id=2)
    key_v = masking.share_encryption_key(sk_v, pk_u, session_id=session_id, own_id=2, peer_id=1)
    ciphertext = masking.encrypt(key_u, b"share bytes", associated_data=b"1->2")
    assert masking.decrypt(key_v, ciphertext, associated_data=b"1->2") == b"share bytes"
    with pytest.raises(ValueError, match="authentication failed"):
        masking.decrypt(key_v, ciphertext, associated_data=b"1->3")
    tampered = ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])
    with pytest.raises(ValueError, match="authentication failed"):
        masking.decrypt(key_v, tampered, associated_data=b"1->2")


def test_max_quantization_bits_formula():
    assert fixed_point.max_quantization_bits(32, 1) == 32
    assert fixed_point.max_quantization_bits(64, 1) == fixed_point.MAX_QUANTIZATION_BITS
    assert fixed_point.max_quantization_bits(32, 10) == 28
    assert fixed_point.max_quantization_bits(32, 2**32) == 0


@pytest.mark.parametrize("modulus_bits", [20, 32, 40, 64])
def test_in_place_masks_equal_masks(modulus_bits):
    # add_self_mask / add_pairwise_mask skip the per-mask reduction; after one
    # reduce_mod the total must equal the sum of the reduced masks.
    config = FixedPointConfig(clipping_range=1.0, max_clients=4, modulus_bits=modulus_bits)
    session_id = secrets.token_bytes(16)
    length = 3000
    start = masking.expand_mask(secrets.token_bytes(32), length, config)
    self_seed, pair_seed = secrets.token_bytes(32), secrets.token_bytes(32)

    expected = add_mod(
        start, masking.self_mask(self_seed, length, config, session_id=session_id), config
    )
    expected = add_mod(
        expected, masking.pairwise_mask(pair_seed, length, config, own_id=1, peer_id=2), config
    )
    expected = add_mod(
        expected, masking.pairwise_mask(pair_seed, length, config, own_id=3, peer_id=0), config
    )

    total = start.copy()
    masking.add_self_mask(total, self_seed, config, session_id=session_id)
    masking.add_pairwise_mask(total, pair_seed, config, own_id=1, peer_id=2)
    masking.add_pairwise_mask(total, pair_seed, config, own_id=3, peer_id=0)
    fixed_point.reduce_mod(total, config)
    np.testing.assert_array_equal(total, expected)
    assert total.dtype == config.dtype
    assert int(total.max()) < 2**modulus_bits


def test_in_place_pairwise_mask_rejects_own_id():
    config = FixedPointConfig(clipping_range=1.0, max_clients=4)
    total = np.zeros(10, dtype=config.dtype)
    with pytest.raises(ValueError, match="no mask with itself"):
        masking.add_pairwise_mask(total, secrets.token_bytes(32), config, own_id=2, peer_id=2)
