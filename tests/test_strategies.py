"""Server optimizers: FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad on hand-built updates."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad as FlowerFedAdagrad
from flwr.serverapp.strategy import FedAvgM as FlowerFedAvgM
from flwr.serverapp.strategy import FedYogi as FlowerFedYogi
from flwr.supercore.task_identity import TaskIdentity

from common.adapter import arrays_to_record
from common.config import ConfigError, ServerConfig
from server.strategies import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    build_optimizer,
)

CURRENT = {
    "layer.lora_A.weight": np.array([[0.5, -1.0, 2.0], [0.0, 0.25, -0.75]], np.float32),
    "layer.lora_B.weight": np.array([[0.0, 0.0], [0.1, -0.2]], np.float32),
}
DELTA = {
    "layer.lora_A.weight": np.array([[0.01, -0.02, 0.0], [0.3, -0.004, 0.05]], np.float64),
    "layer.lora_B.weight": np.array([[0.2, -0.1], [0.0005, 0.07]], np.float64),
}


def test_fedavg_step_adds_delta():
    result = FedAvg().step(CURRENT, DELTA)
    for key, current in CURRENT.items():
        np.testing.assert_allclose(result[key], current + DELTA[key], rtol=1e-6)
        assert result[key].dtype == np.float32


def test_fedprox_sends_mu_and_steps_like_fedavg():
    fedprox = FedProx(proximal_mu=0.3)
    assert fedprox.client_config() == {"proximal-mu": 0.3}
    assert FedAvg().client_config() == {}
    result = fedprox.step(CURRENT, DELTA)
    for key, current in CURRENT.items():
        np.testing.assert_allclose(result[key], current + DELTA[key], rtol=1e-6)


def test_fedavgm_two_steps_formula():
    eta, beta = 0.8, 0.9
    fedavgm = FedAvgM(learning_rate=eta, momentum=beta)
    first = fedavgm.step(CURRENT, DELTA)
    second_delta = {key: -0.5 * value for key, value in DELTA.items()}
    second = fedavgm.step(first, second_delta)
    for key, current in CURRENT.items():
        # v_0 = delta_0, then v_1 = beta * v_0 + delta_1.
        np.testing.assert_allclose(first[key], current + eta * DELTA[key], rtol=1e-6)
        velocity = beta * DELTA[key] + second_delta[key]
        np.testing.assert_allclose(second[key], first[key] + eta * velocity, rtol=1e-5, atol=1e-7)
        assert second[key].dtype == np.float32


def test_fedavgm_first_step_literal():
    # One coordinate: 1.0 + 1.0 * 0.2 = 1.2, then v = 0.9 * 0.2 + 0.2 = 0.38 -> 1.58.
    fedavgm = FedAvgM(learning_rate=1.0, momentum=0.9)
    first = fedavgm.step({"w": np.array([1.0], np.float32)}, {"w": np.array([0.2])})
    second = fedavgm.step(first, {"w": np.array([0.2])})
    assert first["w"][0] == pytest.approx(1.2, rel=1e-6)
    assert second["w"][0] == pytest.approx(1.58, rel=1e-6)


def test_fedavgm_plain_is_fedavg():
    fedavgm = FedAvgM(learning_rate=1.0, momentum=0.0)
    state = CURRENT
    expected = CURRENT
    for scale in (1.0, -0.3):
        delta = {key: scale * value for key, value in DELTA.items()}
        state = fedavgm.step(state, delta)
        expected = FedAvg().step(expected, delta)
    for key in CURRENT:
        np.testing.assert_array_equal(state[key], expected[key])


def test_fedavgm_warns_at_fedopt_scale(caplog):
    with caplog.at_level("WARNING", logger="server.strategies"):
        FedAvgM(learning_rate=0.01, momentum=0.9)
    assert "server.server-learning-rate = 0.01" in caplog.text


def test_fedadam_first_step_matches_formula():
    eta, beta_1, beta_2, tau = 0.05, 0.9, 0.99, 1e-3
    adam = FedAdam(learning_rate=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)
    result = adam.step(CURRENT, DELTA)
    for key, current in CURRENT.items():
        delta = DELTA[key]
        m = (1 - beta_1) * delta
        v = beta_2 * tau**2 + (1 - beta_2) * delta**2  # v_{-1} = tau^2
        expected = current + eta * m / (np.sqrt(v) + tau)
        np.testing.assert_allclose(result[key], expected, rtol=1e-6, atol=1e-7)
    assert adam.t == 1


def test_fedadam_first_step_literal():
    # One coordinate by hand: delta 0.2, eta 0.1, beta_1 0.9, beta_2 0.99, tau 0.
    # m = 0.02, v = 0.01 * 0.04 = 4e-4, sqrt(v) = 0.02, step = 0.1 * 0.02 / 0.02 = 0.1.
    adam = FedAdam(learning_rate=0.1, beta_1=0.9, beta_2=0.99, tau=1e-12)
    result = adam.step({"w": np.array([1.0], np.float32)}, {"w": np.array([0.2])})
    assert result["w"][0] == pytest.approx(1.1, rel=1e-6)


def test_fedadam_second_step_uses_moments():
    eta, beta_1, beta_2, tau = 0.05, 0.9, 0.99, 1e-3
    adam = FedAdam(learning_rate=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)
    first = adam.step(CURRENT, DELTA)
    second_delta = {key: -0.5 * value for key, value in DELTA.items()}
    second = adam.step(first, second_delta)
    for key in CURRENT:
        m1 = (1 - beta_1) * DELTA[key]
        v1 = beta_2 * tau**2 + (1 - beta_2) * DELTA[key] ** 2
        m2 = beta_1 * m1 + (1 - beta_1) * second_delta[key]
        v2 = beta_2 * v1 + (1 - beta_2) * second_delta[key] ** 2
        expected = first[key] + eta * m2 / (np.sqrt(v2) + tau)
        np.testing.assert_allclose(second[key], expected, rtol=1e-5, atol=1e-6)


def test_fedyogi_and_fedadagrad_first_step_match_formula():
    eta, beta_1, beta_2, tau = 0.05, 0.9, 0.99, 1e-3
    yogi = FedYogi(learning_rate=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)
    adagrad = FedAdagrad(learning_rate=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)
    yogi_result = yogi.step(CURRENT, DELTA)
    adagrad_result = adagrad.step(CURRENT, DELTA)
    for key, current in CURRENT.items():
        delta = DELTA[key]
        m = (1 - beta_1) * delta
        v_yogi = tau**2 - (1 - beta_2) * delta**2 * np.sign(tau**2 - delta**2)
        v_adagrad = tau**2 + delta**2
        np.testing.assert_allclose(
            yogi_result[key], current + eta * m / (np.sqrt(v_yogi) + tau), rtol=1e-6
        )
        np.testing.assert_allclose(
            adagrad_result[key], current + eta * m / (np.sqrt(v_adagrad) + tau), rtol=1e-6
        )


def _flower_step(strategy, current, delta):
    """One aggregate_train of a Flower strategy with a single reply at current + delta.

    Flower's FedOpt strategies keep their current arrays in a dict of NumPy arrays, and
    FedAvgM keeps them in an ArrayRecord.
    """
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    if isinstance(strategy, FlowerFedAvgM):
        strategy.current_arrays = arrays_to_record(current)
    else:
        strategy.current_arrays = {key: value.copy() for key, value in current.items()}
    target = {key: (current[key] + delta[key]).astype(np.float32) for key in current}
    instruction = Message(RecordDict({"config": ConfigRecord({})}), 7, "train")
    reply = Message(
        RecordDict(
            {"arrays": arrays_to_record(target), "metrics": MetricRecord({"num-examples": 5})}
        ),
        reply_to=instruction,
    )
    arrays, _ = strategy.aggregate_train(1, [reply])
    return {key: array.numpy() for key, array in arrays.items()}


def test_fedyogi_matches_flower_fedyogi():
    # Flower starts v at 0 and this implementation at tau^2 (Reddi et al.); a tiny tau
    # makes that difference invisible, so the two implementations must agree.
    ours = FedYogi(learning_rate=0.05, beta_1=0.9, beta_2=0.99, tau=1e-9)
    theirs = FlowerFedYogi(eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-9)
    expected = _flower_step(theirs, CURRENT, DELTA)
    result = ours.step(CURRENT, DELTA)
    for key in CURRENT:
        np.testing.assert_allclose(result[key], expected[key], rtol=1e-5, atol=1e-6)


def test_fedavgm_matches_flower():
    ours = FedAvgM(learning_rate=0.7, momentum=0.9)
    theirs = FlowerFedAvgM(server_learning_rate=0.7, server_momentum=0.9)
    state = CURRENT
    for scale in (1.0, -0.4):
        delta = {key: scale * value for key, value in DELTA.items()}
        expected = _flower_step(theirs, state, delta)
        state = ours.step(state, delta)
        for key in CURRENT:
            np.testing.assert_allclose(state[key], expected[key], rtol=1e-5, atol=1e-6)


def test_fedadagrad_matches_flower_fedadagrad():
    ours = FedAdagrad(learning_rate=0.05, beta_1=0.0, beta_2=0.0, tau=1e-9)
    theirs = FlowerFedAdagrad(eta=0.05, tau=1e-9)
    expected = _flower_step(theirs, CURRENT, DELTA)
    result = ours.step(CURRENT, DELTA)
    for key in CURRENT:
        np.testing.assert_allclose(result[key], expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("optimizer_cls", "kwargs"),
    [
        (FedAdam, {"learning_rate": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
        (FedYogi, {"learning_rate": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
        (FedAdagrad, {"learning_rate": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
        (FedAvgM, {"learning_rate": 1.0, "momentum": 0.9}),
    ],
)
def test_state_round_trip_continues(optimizer_cls, kwargs):
    uninterrupted = optimizer_cls(**kwargs)
    state = uninterrupted.step(CURRENT, DELTA)
    saved = {key: value.copy() for key, value in uninterrupted.state_dict().items()}
    expected = uninterrupted.step(state, {k: 0.5 * v for k, v in DELTA.items()})

    restored = optimizer_cls(**kwargs)
    restored.load_state_dict(saved)
    result = restored.step(state, {k: 0.5 * v for k, v in DELTA.items()})
    for key in CURRENT:
        np.testing.assert_array_equal(result[key], expected[key])


def test_fedavg_rejects_optimizer_state():
    with pytest.raises(ValueError, match="no optimizer state"):
        FedAvg().load_state_dict({"t": np.asarray(3)})


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("fedavg", FedAvg),
        ("fedavgm", FedAvgM),
        ("fedprox", FedProx),
        ("fedadam", FedAdam),
        ("fedyogi", FedYogi),
        ("fedadagrad", FedAdagrad),
    ],
)
def test_build_optimizer_by_name(name, cls):
    optimizer = build_optimizer(ServerConfig(strategy=name, server_learning_rate=0.2))
    assert type(optimizer) is cls
    assert optimizer.name == name
    if name.startswith("fedad") or name in ("fedyogi", "fedavgm"):
        assert optimizer.learning_rate == 0.2


def test_fedavgm_rejects_other_strategy_state():
    with pytest.raises(ValueError, match="not velocities"):
        FedAvgM(learning_rate=1.0, momentum=0.9).load_state_dict({"t": np.asarray(3)})


def test_server_momentum_out_of_range():
    with pytest.raises(ConfigError, match="server.server-momentum"):
        ServerConfig(strategy="fedavgm", server_momentum=1.0)


def test_unknown_strategy_is_config_error():
    with pytest.raises(ConfigError, match="server.strategy"):
        ServerConfig(strategy="fedsgd")
