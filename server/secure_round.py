"""One training round under SecAgg+ secure aggregation, as Message API exchanges.

Flower 1.42 ships ``SecAggPlusWorkflow`` (``flwr.server.workflow``) with the client mod
``secaggplus_mod``, but the workflow runs inside Flower's ``DefaultWorkflow`` with a
``LegacyContext`` and a legacy ``Strategy`` (``configure_fit``/``aggregate_fit`` over
``FitIns``/``FitRes`` parameters). It cannot carry this project's per-rank adapters,
train-reply metrics, privacy-budget declines and checkpoints inside
:func:`server.loop.run_rounds`. So this module runs the project's own protocol
(:mod:`common.secagg`) over the Grid, one ``train.secagg_*`` message per stage and client:

1. ``secagg_setup``: session parameters and neighbours out, two public keys back;
2. ``secagg_share_keys``: neighbours' public keys out, encrypted Shamir shares back;
3. ``secagg_masked_input``: the global adapter, train config and forwarded shares out;
   each client trains and sends back its masked update and its metrics;
4. ``secagg_unmask``: the survivor list out, the shares that remove the masks back.

The server receives public keys, ciphertexts it cannot read and masked vectors, keeps
their running sum, and finally unmasks the sum. No client's unmasked update ever reaches it.
Training happens in stage 3, so a round that fails at key exchange costs no privacy budget.

Weighting: each client masks ``w_i Δ_i`` together with ``w_i`` (:mod:`common.secagg.update`)
and the server divides the two sums, which is weighted FedAvg with ``w_i`` the example
count capped at ``server.secagg-max-weight``, or 1 with ``server.weighting = "uniform"``.
The mean is within ``AggregateResult.error_bound`` of the exact one, propagated through
the division (:func:`common.secagg.update.mean_from_sum`), and logged every round.

Validation trade-off: the checks of :mod:`server.validation` need each update in the
clear, so they move to the clients, which reject non-finite updates and clip their delta to
``server.client_clip_norm`` before encoding. The server checks only the shape of each
masked vector and the names, shapes and finiteness of the unmasked mean. The fixed-point
range covers every clipped value, and the modulus is sized so the sum cannot wrap. Robust
rules (median, trimmed mean) need every update and are rejected by the config. An
honest-but-curious server is assumed: a malicious client can still send any vector
within the fixed-point range.

Advertiser-level DP (distributed): with ``advertiser-dp.enabled`` the server sends the
round's clipping norm ``C`` in the train config and sizes the fixed-point range for a
clipped coordinate plus its noise share. Each client clips to ``C``, uses weight 1 and adds
its noise share of ``z_Δ C / sqrt(m_min)`` (plus a noised centred bit for adaptive
clipping) before masking (:mod:`client.distributed_dp`). The server checks that the weight
sum equals the number of contributors, divides the sum by the number sampled and adds no
noise (:meth:`server.central_dp.AdvertiserDP.release_distributed`). The shares are
calibrated for ``m_min = max(server.min-train-nodes, threshold)`` survivors, the fewest
with which a round can aggregate, so with ``s >= m_min`` survivors the realised noise is
``sqrt(s / m_min)`` times the planned one and never below it. The guarantee against the
server rests on it seeing only that sum. Clients who collude with it and subtract their
own shares reduce the noise, the usual caveat of distributed DP.

Dropouts: a client that fails or times out after sharing its keys is removed from the sum
with its reconstructed mask key, as long as at least ``threshold`` share holders answer.
When fewer survive, or fewer than ``server.min-train-nodes`` send a masked input, the
round fails: an ERROR names the stage and the counts, the global adapter stays as it was,
and the run goes on to the next round. Clients that trained in a failed round have
spent privacy budget on it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.config import RunConfig
from common.secagg import records
from common.secagg.fixed_point import layout_of, layout_size
from common.secagg.messages import (
    STAGE_MASKED_INPUT,
    STAGE_SETUP,
    AggregateResult,
    MaskedInputMessage,
    SecAggAbort,
)
from common.secagg.server import SecAggServer
from common.secagg.update import (
    COUNT_KEY,
    WEIGHT_KEY,
    aggregation_layout,
    clipping_range,
    mean_from_sum,
)
from server.aggregation import AggregationOutcome, GlobalAdapter
from server.central_dp import CLIPPING_NORM_CONFIG_KEY, NoiseShares, RoundSampling
from server.nodes import Node, RoundReplies, RoundResult, as_number, train_messages

logger = logging.getLogger(__name__)

T = TypeVar("T")


def threshold_for(cfg: RunConfig, num_participants: int) -> int:
    """Return the number of shares that unmask a client: ``ceil(f * h)``, at least 2.

    ``h`` is the number of the client's share holders: ``server.secagg-num-neighbours + 1``,
    or the number of participants when the graph is complete.
    """
    neighbours = cfg.server.secagg_num_neighbours
    holders = num_participants
    if 0 < neighbours < num_participants - 1:
        holders = neighbours + 1
    # The small offset keeps a product such as 0.6 * 10 = 6.000000000000001 at 6.
    return max(2, math.ceil(cfg.server.secagg_threshold_fraction * holders - 1e-9))


def fixed_point_range(cfg: RunConfig) -> float:
    """Return the fixed-point range ``c``, which covers every clipped, weighted coordinate."""
    max_weight = 1.0 if cfg.server.weighting == "uniform" else cfg.server.secagg_max_weight
    return clipping_range(clip_norm=cfg.server.client_clip_norm, max_weight=max_weight)


class _Session:
    """One round's exchanges with the sampled nodes; stage failures are logged as dropouts."""

    def __init__(
        self, grid: Grid, nodes: Sequence[Node], cfg: RunConfig, server_round: int
    ) -> None:
        self.grid = grid
        self.cfg = cfg
        self.server_round = server_round
        # Session ids follow the client-id order of the sample; node ids never reach clients.
        self.nodes = {index: node for index, node in enumerate(nodes)}
        self.index_of = {node.node_id: index for index, node in self.nodes.items()}
        self.failures: list[str] = []

    def exchange(
        self,
        stage: str,
        messages: Mapping[int, Message],
        read: Callable[[Message, int], T],
    ) -> tuple[dict[int, T], list[Message]]:
        """Send one stage's messages, parse the replies with ``read``; return them by id."""
        replies = list(
            self.grid.send_and_receive(messages.values(), timeout=self.cfg.server.round_timeout)
        )
        parsed: dict[int, T] = {}
        for reply in replies:
            index = self.index_of.get(reply.metadata.src_node_id)
            if index is None or index not in messages or index in parsed:
                continue
            client_id = self.nodes[index].client_id
            if reply.has_error():
                self._fail(stage, client_id, reply.error.reason or "error reply without a reason")
                continue
            try:
                parsed[index] = read(reply, index)
            except (KeyError, TypeError, ValueError) as err:
                self._fail(stage, client_id, f"malformed reply ({err})")
        answered = {self.index_of.get(reply.metadata.src_node_id) for reply in replies}
        for index in messages:
            if index not in answered:
                self._fail(stage, self.nodes[index].client_id, "no reply within the round timeout")
        return parsed, replies

    def _fail(self, stage: str, client_id: str, reason: str) -> None:
        failure = f"client {client_id}: {stage}: {reason}"
        self.failures.append(failure)
        logger.warning("secure_aggregation: round %s: %s", self.server_round, failure)

    def message(self, index: int, action: str, content: RecordDict) -> Message:
        return Message(content, self.nodes[index].node_id, f"train.{action}")


def run_secure_round(
    grid: Grid,
    sampled: Sequence[Node],
    strategy: GlobalAdapter,
    config: ConfigRecord,
    cfg: RunConfig,
    server_round: int,
    *,
    num_available: int | None = None,
) -> RoundResult:
    """Train ``sampled`` clients and aggregate their updates under SecAgg+.

    The global adapter changes only when the whole protocol succeeds with at least
    ``server.min-train-nodes`` contributors. Under advertiser-level DP the minimum is the
    number of survivors the noise shares are calibrated for. Otherwise the round fails as
    described in the module docstring, and ``extra["secagg_failed_stage"]`` names the stage.
    ``num_available`` sets the advertiser-DP sample rate (None: the sampled clients, which
    overstates the rate and so ε).
    """
    server = cfg.server
    session = _Session(grid, sampled, cfg, server_round)
    replies = RoundReplies([], [], {}, session.failures, 0)
    result = RoundResult(replies, len(sampled), 0, (), 0, applied=False, bytes_down=0)
    result.extra = {"secagg_failed_stage": None, "secagg_error_bound": None}
    dp = strategy.advertiser_dp
    sampling = RoundSampling(server_round, len(sampled), num_available or len(sampled))

    def fail(stage: str, reason: str) -> RoundResult:
        logger.error(
            "secure_aggregation: round %s failed at stage %s: %s. Keeping the global adapter "
            "and continuing with the next round",
            server_round,
            stage,
            reason,
        )
        result.extra["secagg_failed_stage"] = stage
        return result

    if len(sampled) < max(2, server.min_train_nodes):
        return fail(
            STAGE_SETUP,
            f"{len(sampled)} clients sampled, fewer than min-train-nodes={server.min_train_nodes}",
        )
    reference = strategy.sent_adapter(cfg.model.lora_r)
    threshold = threshold_for(cfg, len(sampled))
    min_contributors = server.min_train_nodes
    value_range = fixed_point_range(cfg)
    noise_shares: NoiseShares | None = None
    if dp is not None:
        # Distributed DP: clients clip to this round's C and noise for m_min survivors.
        noise_shares = dp.noise_shares(min_survivors=max(server.min_train_nodes, threshold))
        min_contributors = noise_shares.min_survivors
        value_range = noise_shares.fixed_point_range
        config = ConfigRecord({**config, CLIPPING_NORM_CONFIG_KEY: noise_shares.clipping_norm})
    with_count = dp is not None and cfg.advertiser_dp.adaptive_clipping
    layout = aggregation_layout(layout_of(reference), with_count=with_count)
    stage = STAGE_SETUP
    try:
        protocol = SecAggServer(
            list(session.nodes),
            threshold=threshold,
            clipping_range=value_range,
            layout=layout,
            modulus_bits=server.secagg_modulus_bits,
            num_neighbours=server.secagg_num_neighbours or None,
        )

        # Stages 0 and 1: session parameters out, public keys back, neighbours' keys out.
        setups = protocol.setup()
        messages = {
            i: session.message(i, records.SETUP_ACTION, records.setup_content(setups[i], i))
            for i in setups
        }
        keys, _ = session.exchange(
            "advertise_keys",
            messages,
            lambda reply, i: records.read_advertise_keys(reply.content, i),
        )
        public_keys = protocol.receive_keys(list(keys.values()))
        stage = protocol.stage

        # Stage 2: encrypted shares back, and forwarded to their recipients in stage 3.
        messages = {
            i: session.message(
                i,
                records.SHARE_KEYS_ACTION,
                RecordDict({records.CONFIG_KEY: records.public_keys_record(public_keys[i])}),
            )
            for i in public_keys
        }
        shares, _ = session.exchange(
            "share_keys",
            messages,
            lambda reply, i: records.read_share_keys(reply.content, i),
        )
        forwarded = protocol.receive_shares(list(shares.values()))
        stage = protocol.stage

        # Stage 3: the train message plus forwarded shares; metrics and masked input back.
        holders = [session.nodes[i] for i in sorted(forwarded)]
        train, bytes_down = train_messages(
            holders,
            strategy,
            config,
            server.wire_dtype,
            message_type=f"train.{records.MASKED_INPUT_ACTION}",
        )
        result.bytes_down = bytes_down
        messages = {}
        for message in train:
            index = session.index_of[message.metadata.dst_node_id]
            message.content[records.CONFIG_KEY] = records.forwarded_shares_record(forwarded[index])
            messages[index] = message
        length = layout_size(layout)
        dtype = np.dtype(protocol.fixed_point.dtype)

        def read_train_reply(reply: Message, index: int) -> MaskedInputMessage | None:
            metrics = dict(reply.content.metric_records["metrics"])
            client_id = session.nodes[index].client_id
            if as_number(metrics.get("declined", 0)):
                replies.declined.append((client_id, metrics))
                return None
            as_number(metrics["num-examples"])
            masked = records.read_masked_input(reply.content, index)
            vector = masked.masked_input
            if vector.shape != (length,) or vector.dtype != dtype:
                raise ValueError(
                    f"masked input has shape {vector.shape} and dtype {vector.dtype}, "
                    f"expected ({length},) and {dtype}"
                )
            replies.trained_metrics[client_id] = metrics
            replies.bytes_up += int(vector.nbytes)
            return masked

        inputs, train_replies = session.exchange(STAGE_MASKED_INPUT, messages, read_train_reply)
        result.num_replies = len(train_replies)
        masked_inputs = [masked for masked in inputs.values() if masked is not None]
        if len(masked_inputs) < min_contributors:
            # Unmasking now would reveal a sum of too few clients (or, under advertiser-level
            # DP, with too few noise shares), so the shares stay unused.
            needed = (
                f"min-train-nodes={server.min_train_nodes}"
                if noise_shares is None
                else f"the {min_contributors} survivors the noise shares are calibrated for"
            )
            return fail(
                STAGE_MASKED_INPUT,
                f"{len(masked_inputs)} masked inputs, fewer than {needed}",
            )
        requests = protocol.receive_masked_inputs(masked_inputs)
        stage = protocol.stage
        del masked_inputs, inputs

        # Stage 4: the survivors reveal the shares that remove the masks from the sum.
        messages = {
            i: session.message(
                i,
                records.UNMASK_ACTION,
                RecordDict({records.CONFIG_KEY: records.unmask_request_record(requests[i])}),
            )
            for i in requests
        }
        responses, _ = session.exchange(
            "unmask",
            messages,
            lambda reply, i: records.read_unmask_response(reply.content, i),
        )
        aggregate = protocol.unmask(list(responses.values()))
        if noise_shares is None:
            mean, weight_sum, error_bound = mean_from_sum(
                aggregate.update_sum, aggregate.error_bound
            )
        else:
            update_sum = dict(aggregate.update_sum)
            weight_sum = _check_unit_weights(update_sum, aggregate)
            error_bound = aggregate.error_bound / len(sampled)
    except SecAggAbort as err:
        return fail(err.stage, str(err))
    except ValueError as err:
        # A protocol rule was broken (e.g. shares addressed to the wrong clients).
        return fail(stage, str(err))

    contributors = tuple(session.nodes[i].client_id for i in aggregate.contributors)
    logger.info(
        "secure_aggregation: round %s: unmasked the sum of %s clients (weight sum %.6g); "
        "the mean delta is within %.3g of the exact one per coordinate",
        server_round,
        len(contributors),
        weight_sum,
        error_bound,
    )
    outcome: AggregationOutcome
    if noise_shares is None:
        outcome = strategy.apply_secure_mean(mean, contributors)
    else:
        count = update_sum.pop(COUNT_KEY, None)
        outcome = strategy.apply_distributed_sum(
            update_sum,
            contributors,
            centred_count=None if count is None else float(np.asarray(count).reshape(-1)[0]),
            sampling=sampling,
            shares=noise_shares,
        )
    result.accepted = outcome.accepted
    result.applied = outcome.applied
    result.extra["secagg_error_bound"] = error_bound
    return result


def _check_unit_weights(update_sum: dict[str, np.ndarray], aggregate: AggregateResult) -> float:
    """Pop the weight sum from ``update_sum``; raise ValueError unless every weight was 1.

    Under distributed advertiser-level DP each contributor sends weight 1, so the weight
    coordinate sums to the number of contributors, within the fixed-point error.
    """
    weight_sum = float(np.asarray(update_sum.pop(WEIGHT_KEY)).reshape(-1)[0])
    if abs(weight_sum - aggregate.num_contributors) > aggregate.error_bound + 1e-9:
        raise ValueError(
            f"the weights of {aggregate.num_contributors} contributors sum to {weight_sum:.6g}: "
            "under advertiser-level DP every client must send weight 1"
        )
    return weight_sum
