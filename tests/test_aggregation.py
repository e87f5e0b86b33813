"""Global adapter state: validation, weighting, robust rules, wire dtype and mixed ranks."""

from __future__ import annotations

import numpy as np
import pytest

from common.adapter import BFLOAT16, from_wire, payload_bytes, to_wire
from common.config import RunConfig
from server.aggregation import ClientUpdate, GlobalAdapter, MixedRankAdapter, build_global_adapter
from server.robust import aggregate

KEY = "base_model.model.enc.layer.{layer}.{module}.lora_{matrix}.default.weight"
MODULES = [(0, "query", 6, 5), (1, "value", 4, 7)]  # (layer, module, in_features, out_features)
LORA_ALPHA = 8.0


def adapter(rank: int, seed: int, b_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Random adapter of ``rank`` with PEFT's tensor names."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer, module, in_features, out_features in MODULES:
        tensors[KEY.format(layer=layer, module=module, matrix="A")] = rng.normal(
            size=(rank, in_features)
        ).astype(np.float32)
        tensors[KEY.format(layer=layer, module=module, matrix="B")] = (
            b_scale * rng.normal(size=(out_features, rank))
        ).astype(np.float32)
    return tensors


def run_config(**server) -> RunConfig:
    return RunConfig.from_dict(
        {"seed": 3, "model": {"lora-r": 2, "lora-alpha": LORA_ALPHA}, "server": server}
    )


def honest_updates(state, count=3):
    """Clients that moved every tensor by a small seeded step, with 10, 20, 30 examples."""
    updates = []
    for i in range(count):
        rng = np.random.default_rng(100 + i)
        arrays = {
            k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in state.items()
        }
        updates.append(ClientUpdate(f"client-{i:03d}", arrays, 10.0 * (i + 1), rank=2))
    return updates


def test_weighted_mean_by_examples():
    initial = adapter(2, seed=0)
    strategy = GlobalAdapter(initial, run_config())
    updates = honest_updates(initial)
    outcome = strategy.aggregate(updates, min_updates=2)
    assert outcome.applied
    assert outcome.accepted == ("client-000", "client-001", "client-002")
    for key in initial:
        expected = sum(u.num_examples * u.arrays[key].astype(np.float64) for u in updates) / 60
        np.testing.assert_allclose(strategy.state[key], expected, rtol=1e-6, atol=1e-7)


def test_uniform_weighting_is_plain_mean():
    initial = adapter(2, seed=0)
    strategy = GlobalAdapter(initial, run_config(weighting="uniform"))
    updates = honest_updates(initial)
    strategy.aggregate(updates, min_updates=2)
    for key in initial:
        expected = np.mean([u.arrays[key] for u in updates], axis=0)
        np.testing.assert_allclose(strategy.state[key], expected, rtol=1e-6, atol=1e-7)


def test_order_of_replies_does_not_matter():
    initial = adapter(2, seed=0)
    forward, backward = GlobalAdapter(initial, run_config()), GlobalAdapter(initial, run_config())
    updates = honest_updates(initial)
    forward.aggregate(updates, min_updates=1)
    backward.aggregate(list(reversed(updates)), min_updates=1)
    for key in initial:
        np.testing.assert_array_equal(forward.state[key], backward.state[key])


def hostile_updates(state):
    """One update per attack: NaN, wrong shape, extra tensor, float64 and a x100 step."""
    first = min(state)
    nan = {k: v.copy() for k, v in state.items()}
    nan[first][0, 0] = np.nan
    shape = {k: v.copy() for k, v in state.items()}
    rows, columns = state[first].shape
    shape[first] = np.zeros((rows + 1, columns), np.float32)
    oversized = {**state, "extra.weight": np.zeros((512, 512), np.float32)}
    float64 = {k: v.astype(np.float64) for k, v in state.items()}
    rng = np.random.default_rng(9)
    boosted = {
        k: (v + 100 * 0.01 * rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in state.items()
    }
    attacks = {"nan": nan, "shape": shape, "oversized": oversized, "float64": float64}
    attacks["boosted"] = boosted
    return [
        ClientUpdate(f"hostile-{name}", arrays, 1000.0, rank=2, wire_bytes=payload_bytes(arrays))
        for name, arrays in attacks.items()
    ]


def test_hostile_updates_rejected_and_aggregate_unchanged(caplog):
    initial = adapter(2, seed=0)
    honest = honest_updates(initial)
    # Honest steps have L2 norm about 0.01 * sqrt(42) = 0.065; the x100 one about 6.5.
    limits = {"max-update-norm": 1.0, "max-payload-bytes": 4 * payload_bytes(initial)}
    reference = GlobalAdapter(initial, run_config(**limits))
    reference.aggregate(honest, min_updates=2)

    attacked = GlobalAdapter(initial, run_config(**limits))
    with caplog.at_level("WARNING"):
        outcome = attacked.aggregate([*honest, *hostile_updates(initial)], min_updates=2)
    reasons = {error.client_id: error.reason for error in outcome.rejected}
    assert reasons == {
        "hostile-nan": "non-finite",
        "hostile-shape": "shape-mismatch",
        "hostile-oversized": "payload-size",
        "hostile-float64": "dtype",
        "hostile-boosted": "norm-bound",
    }
    assert outcome.accepted == ("client-000", "client-001", "client-002")
    for key in initial:
        np.testing.assert_array_equal(attacked.state[key], reference.state[key])
    assert "hostile-boosted" in caplog.text
    assert "norm-bound" in caplog.text


def test_median_neutralizes_boosted_update():
    initial = adapter(2, seed=0)
    honest = honest_updates(initial, count=4)
    boosted = hostile_updates(initial)[-1]
    strategy = GlobalAdapter(initial, run_config(robust="median"))
    outcome = strategy.aggregate([*honest, boosted], min_updates=2)
    assert len(outcome.accepted) == 5
    for key in initial:
        stacked = np.stack([u.arrays[key] for u in honest])
        assert np.all(strategy.state[key] >= stacked.min(axis=0) - 1e-6)
        assert np.all(strategy.state[key] <= stacked.max(axis=0) + 1e-6)


@pytest.mark.parametrize(("count", "trim_fraction"), [(3, 0.34), (4, 0.25)])
def test_trimmed_mean_few_clients_is_median(count, trim_fraction):
    # Trimming one from each end of 3 or 4 values leaves the median's middle value(s).
    initial = adapter(2, seed=0)
    trimmed = GlobalAdapter(
        initial, run_config(robust="trimmed-mean", **{"trim-fraction": trim_fraction})
    )
    median = GlobalAdapter(initial, run_config(robust="median"))
    updates = honest_updates(initial, count=count)
    assert trimmed.aggregate(updates, min_updates=count).applied
    assert median.aggregate(updates, min_updates=count).applied
    for key in initial:
        np.testing.assert_allclose(trimmed.state[key], median.state[key], rtol=0, atol=1e-6)


def test_median_even_count_averages_middle_pair():
    initial = adapter(2, seed=0)
    strategy = GlobalAdapter(initial, run_config(robust="median"))
    updates = honest_updates(initial, count=4)
    assert strategy.aggregate(updates, min_updates=4).applied
    for key in initial:
        ordered = np.sort(np.stack([update.arrays[key] for update in updates]), axis=0)
        expected = (ordered[1].astype(np.float64) + ordered[2]) / 2
        np.testing.assert_allclose(strategy.state[key], expected, rtol=0, atol=1e-6)


def test_norm_bound_limits_boosted_update():
    initial = adapter(2, seed=0)
    boosted = hostile_updates(initial)[-1]
    strategy = GlobalAdapter(initial, run_config(**{"norm-bound": 0.5}))
    strategy.aggregate([boosted], min_updates=1)
    moved = np.sqrt(sum(np.sum((strategy.state[k] - initial[k]) ** 2) for k in initial))
    assert moved == pytest.approx(0.5, rel=1e-4)


def test_too_few_valid_updates_keep_state():
    initial = adapter(2, seed=0)
    strategy = GlobalAdapter(initial, run_config())
    nan_update = hostile_updates(initial)[0]
    outcome = strategy.aggregate([honest_updates(initial)[0], nan_update], min_updates=2)
    assert not outcome.applied
    assert len(outcome.rejected) == 1
    for key in initial:
        np.testing.assert_array_equal(strategy.state[key], initial[key])


def test_float16_wire_keeps_float32_state():
    initial = adapter(2, seed=0)
    strategy = GlobalAdapter(initial, run_config(**{"wire-dtype": "float16"}))
    sent = strategy.sent_adapter(2)
    first = min(initial)
    assert not np.array_equal(sent[first], initial[first])  # rounded on the wire
    np.testing.assert_allclose(sent[first], initial[first], rtol=1e-3)

    # Clients that send back exactly what they received leave the state untouched.
    unchanged = [
        ClientUpdate(f"client-{i}", {k: v.astype(np.float16) for k, v in sent.items()}, 5.0, 2)
        for i in range(2)
    ]
    outcome = strategy.aggregate(unchanged, min_updates=2)
    assert outcome.applied
    for key in initial:
        np.testing.assert_array_equal(strategy.state[key], initial[key])
        assert strategy.state[key].dtype == np.float32


def test_float32_reply_rejected_on_float16_wire():
    initial = adapter(2, seed=0)
    strategy = GlobalAdapter(initial, run_config(**{"wire-dtype": "float16"}))
    outcome = strategy.aggregate(honest_updates(initial, count=1), min_updates=1)
    assert [error.reason for error in outcome.rejected] == ["dtype"]


def test_bfloat16_wire_keeps_float32_state():
    initial = adapter(2, seed=0)
    strategy = GlobalAdapter(initial, run_config(**{"wire-dtype": "bfloat16"}))
    sent = strategy.sent_adapter(2)
    first = min(initial)
    assert sent[first].dtype == np.float32
    assert not np.array_equal(sent[first], initial[first])  # rounded on the wire
    np.testing.assert_allclose(sent[first], initial[first], rtol=2.0**-8)

    # Every client moved each tensor by +0.01 from what it received and sent it in bfloat16.
    # The state moves by the mean of the decoded steps, so wire rounding changes the steps
    # but not the float32 global adapter they are added to.
    updates = [
        ClientUpdate(
            f"client-{i}", {k: (v + 0.01).astype(BFLOAT16) for k, v in sent.items()}, 5.0, 2
        )
        for i in range(2)
    ]
    outcome = strategy.aggregate(updates, min_updates=2)
    assert outcome.applied
    assert outcome.accepted == ("client-0", "client-1")
    for key in initial:
        assert strategy.state[key].dtype == np.float32
        step = (sent[key] + 0.01).astype(BFLOAT16).astype(np.float64) - sent[key]
        np.testing.assert_allclose(strategy.state[key], initial[key] + step, rtol=0, atol=1e-6)


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("robust", ["none", "median"])
def test_wire_updates_aggregate_like_float32_copies(wire_dtype, robust):
    initial = adapter(2, seed=0)
    strategy = GlobalAdapter(initial, run_config(**{"wire-dtype": wire_dtype, "robust": robust}))
    sent = strategy.sent_adapter(2)
    updates = [
        ClientUpdate(update.client_id, to_wire(update.arrays, wire_dtype), update.num_examples, 2)
        for update in honest_updates(sent, count=5)
    ]
    # The same rule over float32 copies of the received tensors, as from_wire makes them.
    expected = aggregate(
        [from_wire(update.arrays) for update in updates],
        [update.num_examples if robust == "none" else 1.0 for update in updates],
        sent,
        method="mean" if robust == "none" else "median",
    )
    outcome = strategy.aggregate(updates, min_updates=5)
    assert outcome.applied
    for key in initial:
        # FedAvg adds the aggregate's step from the sent adapter to the float32 state.
        step = expected[key].astype(np.float64) - sent[key].astype(np.float64)
        state = (initial[key].astype(np.float64) + step).astype(np.float32)
        np.testing.assert_array_equal(strategy.state[key], state)


def test_float32_reply_rejected_on_bfloat16_wire():
    initial = adapter(2, seed=0)
    strategy = GlobalAdapter(initial, run_config(**{"wire-dtype": "bfloat16"}))
    outcome = strategy.aggregate(honest_updates(initial, count=1), min_updates=1)
    assert [error.reason for error in outcome.rejected] == ["dtype"]


def test_load_state_rejects_other_adapter():
    strategy = GlobalAdapter(adapter(2, seed=0), run_config())
    with pytest.raises(ValueError, match="does not match"):
        strategy.load_state(adapter(3, seed=0), {})


# ---------------------------------------------------------------------------
# Heterogeneous ranks (FlexLoRA)
# ---------------------------------------------------------------------------


def mixed_config(**server) -> RunConfig:
    return RunConfig.from_dict(
        {
            "seed": 3,
            "model": {"lora-alpha": LORA_ALPHA, "client-ranks": "4,8,16"},
            "server": server,
        }
    )


def delta_w(tensors, layer, module, scaling):
    lora_a = tensors[KEY.format(layer=layer, module=module, matrix="A")].astype(np.float64)
    lora_b = tensors[KEY.format(layer=layer, module=module, matrix="B")].astype(np.float64)
    return scaling * lora_b @ lora_a


def prefix(layer, module):
    return KEY.format(layer=layer, module=module, matrix="A").removesuffix(".lora_A.default.weight")


def test_mixed_ranks_start_from_own_rank_init():
    strategy = build_global_adapter(adapter(16, seed=0), mixed_config())
    assert isinstance(strategy, MixedRankAdapter)
    adapters = strategy.client_adapters([4, 8, 16])
    for rank, tensors in adapters.items():
        for layer, module, in_features, out_features in MODULES:
            lora_a = tensors[KEY.format(layer=layer, module=module, matrix="A")]
            lora_b = tensors[KEY.format(layer=layer, module=module, matrix="B")]
            assert lora_a.shape == (rank, in_features)
            assert lora_b.shape == (out_features, rank)
            assert not np.any(lora_b)  # ΔW = 0 before the first aggregation
            assert np.all(np.abs(lora_a) <= 1 / np.sqrt(in_features))
            assert np.std(lora_a) > 0


def test_mixed_ranks_aggregate_to_flexlora_delta_w():
    strategy = MixedRankAdapter(adapter(16, seed=0), mixed_config())
    ranks = [4, 8, 16]
    examples = [10.0, 30.0, 60.0]
    clients = [adapter(rank, seed=10 + rank) for rank in ranks]
    updates = [
        ClientUpdate(f"client-{i}", tensors, examples[i], rank=ranks[i])
        for i, tensors in enumerate(clients)
    ]
    # Each reply is validated against the adapter of its own rank that the client was sent.
    outcome = strategy.aggregate(updates, min_updates=3)
    assert outcome.applied
    assert not outcome.rejected

    for layer, module, _, _ in MODULES:
        expected = sum(
            n * delta_w(tensors, layer, module, LORA_ALPHA / rank)
            for n, tensors, rank in zip(examples, clients, ranks)
        ) / sum(examples)
        np.testing.assert_allclose(
            strategy.state[prefix(layer, module)], expected, rtol=1e-5, atol=1e-5
        )

    # Every client receives the best approximation of ΔW at its own rank.
    adapters = strategy.client_adapters(ranks)
    for rank in ranks:
        for layer, module, in_features, out_features in MODULES:
            target = strategy.state[prefix(layer, module)].astype(np.float64)
            left, singular, right_t = np.linalg.svd(target, full_matrices=False)
            best = (left[:, :rank] * singular[:rank]) @ right_t[:rank]
            received = delta_w(adapters[rank], layer, module, LORA_ALPHA / rank)
            assert adapters[rank][KEY.format(layer=layer, module=module, matrix="A")].shape == (
                rank,
                in_features,
            )
            np.testing.assert_allclose(received, best, rtol=1e-4, atol=1e-4)
    assert strategy.adapter()[KEY.format(layer=0, module="query", matrix="B")].shape == (5, 16)


def test_mixed_ranks_reject_reply_of_other_rank():
    strategy = MixedRankAdapter(adapter(16, seed=0), mixed_config())
    wrong = ClientUpdate("client-0", adapter(8, seed=1), 10.0, rank=4)
    outcome = strategy.aggregate([wrong], min_updates=1)
    assert [error.reason for error in outcome.rejected] == ["shape-mismatch"]
    assert not outcome.applied


def test_mixed_ranks_with_fedadam_steps_in_product_space():
    strategy = MixedRankAdapter(adapter(16, seed=0), mixed_config(strategy="fedadam"))
    update = ClientUpdate("client-0", adapter(4, seed=5), 10.0, rank=4)
    strategy.aggregate([update], min_updates=1)
    cfg = strategy.cfg.server
    for layer, module, _, _ in MODULES:
        delta = delta_w(update.arrays, layer, module, LORA_ALPHA / 4)
        m = (1 - cfg.beta_1) * delta
        v = cfg.beta_2 * cfg.tau**2 + (1 - cfg.beta_2) * delta**2
        expected = cfg.server_learning_rate * m / (np.sqrt(v) + cfg.tau)
        np.testing.assert_allclose(
            strategy.state[prefix(layer, module)], expected, rtol=1e-4, atol=1e-6
        )


def test_mixed_ranks_median_is_taken_in_product_space():
    strategy = MixedRankAdapter(adapter(16, seed=0), mixed_config(robust="median"))
    ranks = [4, 8, 16]
    clients = [adapter(rank, seed=20 + rank) for rank in ranks]
    updates = [
        ClientUpdate(f"client-{i}", tensors, 10.0, rank=ranks[i])
        for i, tensors in enumerate(clients)
    ]
    outcome = strategy.aggregate(updates, min_updates=3)
    assert outcome.applied
    assert not outcome.rejected

    # The median is taken over the clients' ΔW_i, entry by entry. A rule on lora_A and
    # lora_B could not be applied, because their shapes differ between ranks.
    for layer, module, _, _ in MODULES:
        stacked = np.stack(
            [
                delta_w(tensors, layer, module, LORA_ALPHA / rank)
                for tensors, rank in zip(clients, ranks)
            ]
        )
        np.testing.assert_allclose(
            strategy.state[prefix(layer, module)], np.median(stacked, axis=0), rtol=1e-5, atol=1e-5
        )
    adapters = strategy.client_adapters(ranks)
    for rank in ranks:
        layer, module, in_features, _ = MODULES[0]
        lora_a = adapters[rank][KEY.format(layer=layer, module=module, matrix="A")]
        assert lora_a.shape == (rank, in_features)
