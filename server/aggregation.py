"""Global adapter state on the server: what each client starts from and how replies update it.

Each round, :meth:`GlobalAdapter.client_adapters` gives the adapter that a client of each
rank starts from, and :meth:`GlobalAdapter.aggregate` turns the replies into the next
global state:

1. every update is validated against the adapter that client was sent, as it arrived after
   the wire cast (:mod:`server.validation`). Rejected updates are logged and left out.
2. the valid ones are combined by weighted mean, coordinate-wise median or trimmed mean,
   optionally after norm bounding (:func:`server.robust.aggregate`). With advertiser-level
   DP, they are instead clipped, averaged over the sampled clients and noised
   (:class:`server.central_dp.AdvertiserDP`);
3. the difference between that aggregate and the point it is measured from is the
   pseudo-gradient ``Δ_t``, and the server optimizer (:mod:`server.strategies`) takes
   one step with it.

:class:`GlobalAdapter` serves runs in which every client has the same rank: its state is
the adapter itself. :class:`MixedRankAdapter` serves heterogeneous ranks with FlexLoRA:
its state is ``ΔW = scaling * B @ A`` per module (:mod:`server.mixed_rank`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common.adapter import Arrays, from_wire, to_wire
from common.config import RunConfig
from server.central_dp import AdvertiserDP, NoiseShares, RoundSampling
from server.mixed_rank import delta_weights, lora_pairs, project_to_client_ranks
from server.robust import AggregationMethod, aggregate
from server.strategies import FedAvg, build_optimizer
from server.validation import InvalidUpdate, UpdateLimits, filter_valid_updates

logger = logging.getLogger(__name__)

_ROBUST_METHODS: dict[str, AggregationMethod] = {
    "none": "mean",
    "median": "median",
    "trimmed-mean": "trimmed-mean",
}


@dataclass(frozen=True)
class ClientUpdate:
    """One trained reply: the tensors as received (wire dtype), example count and rank."""

    client_id: str
    arrays: Mapping[str, np.ndarray]
    num_examples: float
    rank: int
    wire_bytes: int = 0


@dataclass(frozen=True)
class AggregationOutcome:
    """Outcome of one aggregation: accepted and rejected updates, and whether state changed."""

    accepted: tuple[str, ...]
    rejected: tuple[InvalidUpdate, ...]
    applied: bool


class GlobalAdapter:
    """Global adapter of a run in which every client has rank ``model.lora-r``.

    The state is the adapter (float32, the trainable tensors only; with FFA-LoRA that is
    every ``lora_B``). Updates are combined relative to the adapter the clients received,
    i.e. after the round trip through ``server.wire-dtype``, so a float16 wire rounds
    what travels but never the float32 global state.

    The weighting does not change record-level DP at the clients: the server combines
    outputs that are already private, which is post-processing. It matters for
    advertiser-level DP, where a client's share ``w_i / Σ w_j`` sets the sensitivity
    (see :func:`server.robust.aggregate`), so that mode uses equal weights over the
    sampled clients and its noise goes on the pseudo-gradient before the server optimizer.

    Validation and the robust rules read each client's update in the clear, so under
    secure aggregation they give way to client-side norm bounding and the checks of
    :meth:`apply_secure_mean` on the unmasked mean (:mod:`server.secure_round`).

    Parameters
    ----------
    initial : Arrays
        Adapter of the server's model, the state before round 1.
    cfg : RunConfig
        Run config; ``server`` sets the optimizer, weighting, robust rule and limits.
    optimizer : FedAvg or None
        Server optimizer; default :func:`server.strategies.build_optimizer`.
    """

    def __init__(self, initial: Mapping[str, np.ndarray], cfg: RunConfig, *, optimizer=None):
        server = cfg.server
        self.cfg = cfg
        self.optimizer: FedAvg = optimizer or build_optimizer(server)
        self.state: Arrays = {key: np.array(value, np.float32) for key, value in initial.items()}
        self.limits = UpdateLimits(
            max_update_norm=server.max_update_norm or None,
            max_payload_bytes=server.max_payload_bytes or None,
            allowed_dtypes=(server.wire_dtype,),
        )
        self.method = _ROBUST_METHODS[server.robust]
        # Median and trimmed mean are unweighted; weighting them would only raise a warning.
        self.uniform = server.weighting == "uniform" or server.robust != "none"
        if server.robust != "none" and server.weighting == "examples":
            logger.info(
                "aggregate_train: server.robust = %s is unweighted, so server.weighting = "
                "examples has no effect",
                server.robust,
            )
        self.advertiser_dp = AdvertiserDP.from_run_config(cfg)
        self._sent: dict[int, Arrays] = {}

    # -- what clients start from -------------------------------------------------------

    def ranks(self) -> tuple[int, ...]:
        """Ranks this state can serve."""
        return (self.cfg.model.lora_r,)

    def _client_adapters(self, ranks: Sequence[int]) -> dict[int, Arrays]:
        return {rank: self.state for rank in ranks}

    def client_adapters(self, ranks: Iterable[int]) -> dict[int, Arrays]:
        """Adapter that a client of each rank starts from, float32 (before the wire cast)."""
        wanted = sorted(set(ranks))
        unknown = [rank for rank in wanted if rank not in self.ranks()]
        if unknown:
            raise ValueError(
                f"no adapter of rank {unknown}: this run serves ranks {list(self.ranks())}; "
                "set model.client-ranks to include them or fix the node's lora-rank"
            )
        return self._client_adapters(wanted)

    def sent_adapter(self, rank: int) -> Arrays:
        """Return the adapter a client of ``rank`` receives after the wire cast, in float32."""
        if rank not in self._sent:
            adapter = self.client_adapters([rank])[rank]
            self._sent[rank] = from_wire(to_wire(adapter, self.cfg.server.wire_dtype))
        return self._sent[rank]

    def adapter(self) -> Arrays:
        """Global adapter at the server model's rank, for saving and evaluation."""
        return self.client_adapters([self.cfg.model.max_rank])[self.cfg.model.max_rank]

    # -- aggregation ------------------------------------------------------------------

    def _reference(self) -> Arrays:
        """Point that client updates and the aggregate are measured from."""
        return self.sent_adapter(self.cfg.model.lora_r)

    def _to_state_space(self, update: ClientUpdate) -> Mapping[str, np.ndarray]:
        """Return the update's tensors as received, with no copy.

        Aggregation casts them to float64 tensor by tensor, which is exact for every wire
        dtype, so a float32 copy of all updates (as :func:`from_wire` makes) is not needed.
        """
        return update.arrays

    def validate(self, updates: Sequence[ClientUpdate]) -> tuple[list, list[InvalidUpdate]]:
        """Split updates into valid ones and rejections (each logged with its client id)."""
        valid: list[ClientUpdate] = []
        rejected: list[InvalidUpdate] = []
        limit = self.limits.max_payload_bytes
        for update in sorted(updates, key=lambda u: u.client_id):
            if limit is not None and update.wire_bytes > limit:
                error = InvalidUpdate(
                    update.client_id,
                    "payload-size",
                    f"message tensors are {update.wire_bytes} bytes, limit "
                    f"max_payload_bytes={limit}",
                )
                logger.warning(
                    "aggregate_train: rejected update from client %s (%s): %s",
                    error.client_id,
                    error.reason,
                    error.detail,
                )
                rejected.append(error)
                continue
            weight = 1.0 if self.uniform else update.num_examples
            entry = (update.client_id, update.arrays, weight)
            reference = self.sent_adapter(update.rank)
            kept, errors = filter_valid_updates([entry], reference, self.limits)
            rejected.extend(errors)
            if kept:
                valid.append(update)
        return valid, rejected

    def aggregate(
        self,
        updates: Sequence[ClientUpdate],
        *,
        min_updates: int,
        sampling: RoundSampling | None = None,
    ) -> AggregationOutcome:
        """Validate ``updates``, combine the valid ones and step the server optimizer.

        The state changes only when at least ``min_updates`` updates are valid; otherwise
        a WARNING is logged and the global adapter is kept. Updates are processed in order
        of client id, so the result does not depend on the order replies arrived in.
        With advertiser-level DP, ``sampling`` (the round and how many clients it sampled
        out of how many) is required.
        """
        valid, rejected = self.validate(updates)
        accepted = tuple(update.client_id for update in valid)
        if len(valid) < min_updates:
            logger.warning(
                "aggregate_train: %s valid updates, fewer than min-train-nodes=%s: keeping "
                "the global adapter",
                len(valid),
                min_updates,
            )
            return AggregationOutcome(accepted, tuple(rejected), applied=False)

        reference = self._reference()
        points = [self._to_state_space(update) for update in valid]
        if self.advertiser_dp is not None:
            if sampling is None:
                raise ValueError("advertiser-level DP needs the round's sampling to aggregate")
            delta = self.advertiser_dp.privatize(_Differences(points, reference), sampling)
        else:
            weights = [1.0 if self.uniform else float(update.num_examples) for update in valid]
            combined = aggregate(
                points,
                weights,
                reference,
                method=self.method,
                trim_fraction=self.cfg.server.trim_fraction,
                norm_bound=self.cfg.server.norm_bound or None,
            )
            delta = _difference(combined, reference)
        self.state = self.optimizer.step(self.state, delta)
        self._sent.clear()
        return AggregationOutcome(accepted, tuple(rejected), applied=True)

    def apply_secure_mean(
        self, delta: Mapping[str, np.ndarray], contributors: Sequence[str]
    ) -> AggregationOutcome:
        """Step the server optimizer with the mean delta that secure aggregation unmasked.

        Only this mean is visible, so the checks that remain are its tensor names, shapes
        and finiteness. A failed check is logged as an ERROR, and the global adapter is kept.
        """
        accepted = tuple(sorted(contributors))
        if not self._check_unmasked(delta, "mean", len(accepted)):
            return AggregationOutcome(accepted, (), applied=False)
        as_float64 = {key: np.asarray(value, np.float64) for key, value in delta.items()}
        self.state = self.optimizer.step(self.state, as_float64)
        self._sent.clear()
        return AggregationOutcome(accepted, (), applied=True)

    def apply_distributed_sum(
        self,
        update_sum: Mapping[str, np.ndarray],
        contributors: Sequence[str],
        *,
        centred_count: float | None,
        sampling: RoundSampling,
        shares: NoiseShares,
    ) -> AggregationOutcome:
        """Step the server optimizer with an unmasked sum that clients clipped and noised.

        Distributed advertiser-level DP (:meth:`AdvertiserDP.release_distributed`): the sum
        is divided by the number sampled and no noise is added here. The sum is checked
        like :meth:`apply_secure_mean` checks a mean, before the round is accounted.
        """
        if self.advertiser_dp is None:
            raise RuntimeError("apply_distributed_sum() needs advertiser-dp.enabled = true")
        accepted = tuple(sorted(contributors))
        if not self._check_unmasked(update_sum, "sum", len(accepted)):
            return AggregationOutcome(accepted, (), applied=False)
        delta = self.advertiser_dp.release_distributed(
            update_sum,
            centred_count=centred_count,
            num_contributors=len(accepted),
            sampling=sampling,
            shares=shares,
        )
        self.state = self.optimizer.step(self.state, delta)
        self._sent.clear()
        return AggregationOutcome(accepted, (), applied=True)

    def _check_unmasked(
        self, arrays: Mapping[str, np.ndarray], what: str, num_contributors: int
    ) -> bool:
        """Return whether an unmasked aggregate fits the state; log an ERROR when not."""
        expected = {key: np.shape(value) for key, value in self.state.items()}
        found = {key: np.shape(value) for key, value in arrays.items()}
        problem = ""
        if expected != found:
            differing = sorted(set(expected) ^ set(found)) or sorted(
                key for key in expected if expected[key] != found[key]
            )
            problem = f"its tensors differ from the global adapter's (e.g. {differing[:2]})"
        elif not all(np.all(np.isfinite(value)) for value in arrays.values()):
            problem = "it contains NaN or infinite values"
        if problem:
            logger.error(
                "aggregate_train: the unmasked %s of %s clients is invalid: %s; keeping "
                "the global adapter",
                what,
                num_contributors,
                problem,
            )
        return not problem

    # -- checkpoint -------------------------------------------------------------------

    def load_state(
        self, state: Mapping[str, np.ndarray], optimizer: Mapping[str, np.ndarray]
    ) -> None:
        """Restore a checkpointed state; names and shapes must match this run's state."""
        expected = {key: value.shape for key, value in self.state.items()}
        found = {key: np.shape(value) for key, value in state.items()}
        if expected != found:
            differing = sorted(set(expected) ^ set(found)) or sorted(
                key for key in expected if expected[key] != found[key]
            )
            raise ValueError(
                f"checkpointed global state does not match this run's adapter "
                f"({len(differing)} tensors differ, e.g. {differing[:2]}): resume with the "
                "run's own config.toml"
            )
        self.state = {key: np.array(value, np.float32) for key, value in state.items()}
        self.optimizer.load_state_dict(optimizer)
        self._sent.clear()


def _difference(
    point: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Return ``point - reference`` per tensor, in float64."""
    return {
        key: np.asarray(point[key], np.float64) - np.asarray(reference[key], np.float64)
        for key in reference
    }


class _Differences(Sequence):
    """``points[i] - reference`` in float64, computed when item ``i`` is read.

    Iterating keeps one difference in memory at a time instead of all of them, and the
    reference is cast to float64 once instead of once per point.
    """

    def __init__(
        self, points: Sequence[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray]
    ) -> None:
        self._points = points
        self._reference = {key: np.asarray(value, np.float64) for key, value in reference.items()}

    def __len__(self) -> int:
        return len(self._points)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return _difference(self._points[index], self._reference)


class MixedRankAdapter(GlobalAdapter):
    """Global state of a run with heterogeneous client ranks (FlexLoRA).

    J. Bai, D. Chen, B. Qian, L. Yao, Y. Li, "Federated Fine-tuning of Large Language
    Models under Heterogeneous Tasks and Client Resources", NeurIPS 2024. The state is
    ``ΔW = scaling * B @ A`` per LoRA module (dense float32, ``(out, in)``), plus any
    other trainable tensor (a trained head) as is. Client ``i`` of rank ``r_i`` sends
    ``A_i, B_i`` and is mapped to ``ΔW_i = (lora_alpha / r_i) * B_i @ A_i``; with the
    weighted mean, the new state is ``Σ_i w_i ΔW_i / Σ_i w_i``, FlexLoRA's global update.
    Each client then receives the best rank-``r_i`` approximation of the state (truncated
    SVD, :func:`server.mixed_rank.project_to_client_ranks`). While the state is zero
    (before the first aggregation), clients receive ``B = 0`` and a seeded random ``A``
    drawn like PEFT's initialization, uniform in ``±1 / sqrt(in_features)``.

    NOTE: the dense state (and FedOpt's ``m`` and ``v``) takes ``out * in`` floats per
    module: about 42 MB for MiniLM-L6, but gigabytes for 7B-parameter models.
    """

    def __init__(self, initial: Mapping[str, np.ndarray], cfg: RunConfig, *, optimizer=None):
        self.pairs = lora_pairs(initial)
        self.shapes = {
            prefix: (np.shape(initial[key_b])[0], np.shape(initial[key_a])[1])
            for prefix, (key_a, key_b) in self.pairs.items()
        }  # prefix -> (out_features, in_features)
        paired = {key for pair in self.pairs.values() for key in pair}
        self.others = [key for key in initial if key not in paired]
        state = {prefix: np.zeros(shape, np.float32) for prefix, shape in self.shapes.items()}
        state.update({key: np.asarray(initial[key], np.float32) for key in self.others})
        super().__init__(state, cfg, optimizer=optimizer)
        self._adapters: dict[int, Arrays] = {}

    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({*self.cfg.model.rank_list, self.cfg.model.max_rank}))

    def scaling(self, rank: int) -> float:
        return self.cfg.model.lora_alpha / rank

    def _template(self, rank: int) -> Arrays:
        """Zero adapter of ``rank`` with the server model's tensor names."""
        template = {}
        for prefix, (key_a, key_b) in self.pairs.items():
            out_features, in_features = self.shapes[prefix]
            template[key_a] = np.zeros((rank, in_features), np.float32)
            template[key_b] = np.zeros((out_features, rank), np.float32)
        return template

    def _initial_adapter(self, rank: int) -> Arrays:
        rng = np.random.default_rng([self.cfg.seed, rank])
        adapter = {}
        for prefix, (key_a, key_b) in self.pairs.items():
            out_features, in_features = self.shapes[prefix]
            bound = 1.0 / np.sqrt(in_features)
            adapter[key_a] = rng.uniform(-bound, bound, (rank, in_features)).astype(np.float32)
            adapter[key_b] = np.zeros((out_features, rank), np.float32)
        return adapter

    def _client_adapters(self, ranks: Sequence[int]) -> dict[int, Arrays]:
        if any(rank not in self._adapters for rank in ranks):
            # The SVDs dominate the cost, so one pass serves every rank of the run.
            wanted = sorted(set(self.ranks()) | set(ranks))
            delta_w = {prefix: self.state[prefix] for prefix in self.pairs}
            if not any(np.any(matrix) for matrix in delta_w.values()):
                lora = [self._initial_adapter(rank) for rank in wanted]
            else:
                # TODO: when the state is a weighted sum of client products (FedAvg), its
                # SVD follows from QR factors of the stacked B_i and A_i, without the
                # dense (out, in) SVD that dominates a round's server time.
                lora = project_to_client_ranks(
                    delta_w,
                    [self._template(rank) for rank in wanted],
                    [self.scaling(rank) for rank in wanted],
                )
            for rank, adapter in zip(wanted, lora):
                adapter.update({key: self.state[key] for key in self.others})
                self._adapters[rank] = adapter
        return {rank: self._adapters[rank] for rank in ranks}

    def _reference(self) -> Arrays:
        return self.state

    def _to_state_space(self, update: ClientUpdate) -> Mapping[str, np.ndarray]:
        # NOTE: aggregate() keeps this dense point of every valid update in memory at
        # once, so memory grows as num_updates * out * in per module.
        arrays = from_wire(update.arrays)
        point: dict[str, np.ndarray] = dict(
            delta_weights(arrays, scaling=self.scaling(update.rank))
        )
        point.update({key: arrays[key] for key in self.others})
        return point

    def aggregate(
        self,
        updates: Sequence[ClientUpdate],
        *,
        min_updates: int,
        sampling: RoundSampling | None = None,
    ) -> AggregationOutcome:
        outcome = super().aggregate(updates, min_updates=min_updates, sampling=sampling)
        if outcome.applied:
            self._adapters.clear()
        return outcome

    def load_state(
        self, state: Mapping[str, np.ndarray], optimizer: Mapping[str, np.ndarray]
    ) -> None:
        super().load_state(state, optimizer)
        self._adapters.clear()


def build_global_adapter(initial: Mapping[str, np.ndarray], cfg: RunConfig) -> GlobalAdapter:
    """Global state for ``cfg``: FlexLoRA when ``model.client-ranks`` is set."""
    if cfg.model.rank_list:
        return MixedRankAdapter(initial, cfg)
    return GlobalAdapter(initial, cfg)
