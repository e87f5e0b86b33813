"""Server optimizers: FedAvg, FedAvgM, FedProx and the FedOpt family (FedAdagrad, FedYogi, FedAdam).

Each optimizer maps the global state ``x_t`` and the pseudo-gradient
``Δ_t = aggregate_t - x_t`` to the next global state ``x_{t+1}``
(:class:`server.aggregation.GlobalAdapter` computes ``Δ_t`` from validated client
updates). Keys are whatever the state holds: adapter tensor names, or LoRA module names
when the state is ``ΔW`` per module. Every optimizer keeps its state in NumPy arrays, so
:mod:`server.checkpoint` saves and restores it exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from common.adapter import Arrays
from common.config import ServerConfig

logger = logging.getLogger(__name__)


class FedAvg:
    """Federated averaging: the next global state is the aggregate of the client updates.

    H. B. McMahan, E. Moore, D. Ramage, S. Hampson, B. Agüera y Arcas, "Communication-
    Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017. Written
    as a server step on the pseudo-gradient, FedAvg is ``x_{t+1} = x_t + Δ_t``
    (server learning rate 1). It has no state.
    """

    name = "fedavg"

    def client_config(self) -> dict[str, float]:
        """Entries this strategy adds to every train message's config."""
        return {}

    def step(self, current: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Arrays:
        """Return the next global state, float32."""
        return {
            key: (np.asarray(current[key], np.float64) + delta[key]).astype(np.float32)
            for key in current
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        """Optimizer state as named arrays (empty for FedAvg and FedProx)."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`; FedAvg accepts only an empty state."""
        if state:
            raise ValueError(
                f"strategy {self.name} has no optimizer state, but the checkpoint contains "
                f"{len(state)} optimizer arrays: resume with the strategy that wrote it"
            )


class FedAvgM(FedAvg):
    """FedAvg with server momentum (FedAvgM).

    T.-M. H. Hsu, H. Qi, M. Brown, "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification", arXiv:1909.06335, 2019. With
    ``Δ_t = aggregate_t - x_t``:

        v_t     = momentum * v_{t-1} + Δ_t      (v_0 = Δ_0)
        x_{t+1} = x_t + learning_rate * v_t

    as Flower's ``FedAvgM`` computes it. With ``momentum = 0`` and ``learning_rate = 1``
    it is FedAvg. While the update direction stays the same, the step grows towards
    ``learning_rate / (1 - momentum)`` times the averaged update, so rounds in which each
    sampled client takes few local steps still move the adapter far. The velocity ``v``
    is checkpointed.

    NOTE: the velocity also carries every round's DP noise forward. In the main job's
    setup (record-level DP at ε = 8, 5 of 20 advertisers per round), learning rate 1 with
    momentum 0.9 diverged after 4 rounds, and momentum 0.5 scored level with FedAvg
    (``BENCHMARKS.md``).
    """

    name = "fedavgm"

    def __init__(self, *, learning_rate: float, momentum: float) -> None:
        if learning_rate < 0.1:
            logger.warning(
                "fedavgm: server.server-learning-rate = %g scales each averaged update by "
                "that factor; FedAvgM usually takes about 1.0 (0.01 is the FedOpt family's scale)",
                learning_rate,
            )
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.velocity: Arrays = {}

    def step(self, current: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Arrays:
        updated = {}
        for key, value in current.items():
            d = np.asarray(delta[key], np.float64)
            if key in self.velocity:
                d = self.momentum * self.velocity[key].astype(np.float64) + d
            self.velocity[key] = d.astype(np.float32)
            updated[key] = (np.asarray(value, np.float64) + self.learning_rate * d).astype(
                np.float32
            )
        return updated

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"velocity/{key}": value for key, value in self.velocity.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        prefix = "velocity/"
        unknown = [key for key in state if not key.startswith(prefix)]
        if unknown:
            raise ValueError(
                f"invalid optimizer state for {self.name}: arrays {unknown[:3]} are not "
                "velocities, so another strategy wrote the checkpoint; resume with that strategy"
            )
        self.velocity = {
            key[len(prefix) :]: np.asarray(value, np.float32) for key, value in state.items()
        }


class FedProx(FedAvg):
    """FedProx: FedAvg on the server, a proximal term in every client's objective.

    T. Li, A. K. Sahu, M. Zaheer, M. Sanjabi, A. Talwalkar, V. Smith, "Federated
    Optimization in Heterogeneous Networks", MLSys 2020. Each client minimizes
    ``F_k(w) + mu / 2 * ||w - w_t||^2``, which limits how far local training drifts
    from the global adapter ``w_t``. The server sends ``mu`` as ``proximal-mu`` and
    :func:`client.train.train_local` adds the term to each sample's loss.
    """

    name = "fedprox"

    def __init__(self, *, proximal_mu: float) -> None:
        if proximal_mu == 0.0:
            logger.warning("fedprox: proximal_mu = 0 turns FedProx into FedAvg")
        self.proximal_mu = proximal_mu

    def client_config(self) -> dict[str, float]:
        return {"proximal-mu": self.proximal_mu}


class FedOpt(FedAvg):
    """Adaptive server optimizer on the pseudo-gradient (FedOpt, Algorithm 2 of Reddi et al.).

    S. J. Reddi, Z. Charles, M. Zaheer, Z. Garrett, K. Rush, J. Konečný, S. Kumar,
    H. B. McMahan, "Adaptive Federated Optimization", ICLR 2021. With
    ``Δ_t = aggregate_t - x_t``:

        m_t     = beta_1 * m_{t-1} + (1 - beta_1) * Δ_t
        v_t     = subclass rule (Adagrad, Yogi or Adam)
        x_{t+1} = x_t + learning_rate * m_t / (sqrt(v_t) + tau)

    with ``m_{-1} = 0`` and ``v_{-1} = tau^2``, as in the paper, and no bias correction.
    Flower 1.42's ``FedAdam`` adds Adam's bias correction to the learning rate, but this
    class follows the paper. ``tau`` bounds the step of coordinates whose ``v`` is small.
    The state ``(m, v, t)`` is float32 arrays plus the step count, and is checkpointed.
    """

    name = "fedopt"

    def __init__(self, *, learning_rate: float, beta_1: float, beta_2: float, tau: float) -> None:
        self.learning_rate = learning_rate
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.tau = tau
        self.m: Arrays = {}
        self.v: Arrays = {}
        self.t = 0

    def _second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step(self, current: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Arrays:
        if not self.m:
            self.m = {key: np.zeros_like(value, np.float32) for key, value in current.items()}
            self.v = {
                key: np.full_like(value, self.tau**2, np.float32) for key, value in current.items()
            }
        updated = {}
        for key, value in current.items():
            d = np.asarray(delta[key], np.float64)
            m = self.beta_1 * self.m[key].astype(np.float64) + (1.0 - self.beta_1) * d
            v = self._second_moment(self.v[key].astype(np.float64), d * d)
            self.m[key] = m.astype(np.float32)
            self.v[key] = v.astype(np.float32)
            step = self.learning_rate * m / (np.sqrt(v) + self.tau)
            updated[key] = (np.asarray(value, np.float64) + step).astype(np.float32)
        self.t += 1
        return updated

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {"t": np.asarray(self.t, dtype=np.int64)}
        state.update({f"m/{key}": value for key, value in self.m.items()})
        state.update({f"v/{key}": value for key, value in self.v.items()})
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.t = int(state.get("t", 0))
        self.m = {k[2:]: np.asarray(v, np.float32) for k, v in state.items() if k[:2] == "m/"}
        self.v = {k[2:]: np.asarray(v, np.float32) for k, v in state.items() if k[:2] == "v/"}
        if set(self.m) != set(self.v):
            raise ValueError(
                f"optimizer state of {self.name} has {len(self.m)} first-moment and "
                f"{len(self.v)} second-moment arrays with different names: the checkpoint "
                "is damaged; resume from an intact copy"
            )


class FedAdagrad(FedOpt):
    """FedAdagrad (Reddi et al., ICLR 2021): ``v_t = v_{t-1} + Δ_t^2``."""

    name = "fedadagrad"

    def _second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> np.ndarray:
        return v + delta_squared


class FedYogi(FedOpt):
    """FedYogi (Reddi et al., ICLR 2021).

    ``v_t = v_{t-1} - (1 - beta_2) * Δ_t^2 * sign(v_{t-1} - Δ_t^2)``: ``v`` moves towards
    ``Δ_t^2`` by an additive step, so it grows no faster than Adam's and shrinks slower.
    """

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta_2) * delta_squared * np.sign(v - delta_squared)


class FedAdam(FedOpt):
    """FedAdam (Reddi et al., ICLR 2021): ``v_t = beta_2 * v_{t-1} + (1 - beta_2) * Δ_t^2``."""

    name = "fedadam"

    def _second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> np.ndarray:
        return self.beta_2 * v + (1.0 - self.beta_2) * delta_squared


def build_optimizer(server: ServerConfig) -> FedAvg:
    """Server optimizer named by ``server.strategy``."""
    if server.strategy == "fedavg":
        return FedAvg()
    if server.strategy == "fedavgm":
        return FedAvgM(learning_rate=server.server_learning_rate, momentum=server.server_momentum)
    if server.strategy == "fedprox":
        return FedProx(proximal_mu=server.proximal_mu)
    adaptive = {"fedadagrad": FedAdagrad, "fedyogi": FedYogi, "fedadam": FedAdam}
    if server.strategy not in adaptive:
        raise ValueError(
            f"invalid server.strategy = {server.strategy!r}: expected fedavg, fedavgm, "
            "fedprox, fedadam, fedyogi or fedadagrad"
        )
    return adaptive[server.strategy](
        learning_rate=server.server_learning_rate,
        beta_1=server.beta_1,
        beta_2=server.beta_2,
        tau=server.tau,
    )
