"""ClientApp side of secure aggregation: one handler per SecAgg+ stage.

The server drives four message exchanges per round (:mod:`server.secure_round`), each a
``train.<action>`` message that Flower routes to one handler here:

1. ``secagg_setup``: store the session, reply with two fresh X25519 public keys;
2. ``secagg_share_keys``: reply with encrypted Shamir shares of this client's secrets;
3. ``secagg_masked_input``: train (or decline), then reply with the masked update and
   the usual metrics. A rerun of a round this client already trained is declined, and
   the stored update is not sent again, so no update is masked in two sessions;
4. ``secagg_unmask``: reply with the shares that remove the survivors' masks.

Between stages the session state, private keys included, lives in the node's
``Context.state``, which stays on the client's side. Under secure aggregation the server
cannot validate one update, so this side does what it can: it rejects a non-finite
update and scales its delta down to ``server.client_clip_norm``
(:func:`common.secagg.update.weighted_vector`) before encoding.

With advertiser-level DP on as well, the client instead clips to the round's
advertiser-DP clipping norm, uses weight 1 and adds its share of the DP noise (and, with
adaptive clipping, its noised bit) before encoding (:mod:`client.distributed_dp`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.distributed_dp import distributed_vector, round_noise_shares
from client.outcome import TrainOutcome, decline_content, train_metrics
from common.adapter import from_wire, record_to_arrays
from common.config import RunConfig
from common.secagg import records
from common.secagg.client import SecAggClient
from common.secagg.update import NoiseShare, clipping_range, weighted_vector

logger = logging.getLogger(__name__)

# Key of the session state in Context.state.
STATE_KEY = "secagg-client"

TrainRound = Callable[[Message, Context, RunConfig], TrainOutcome]


def aggregation_weight(cfg: RunConfig, num_examples: float) -> float:
    """Weight a client sends: its example count capped at ``server.secagg-max-weight``, or 1."""
    if cfg.server.weighting == "uniform":
        return 1.0
    return float(min(num_examples, cfg.server.secagg_max_weight))


def _save(context: Context, client: SecAggClient) -> None:
    context.state.config_records[STATE_KEY] = ConfigRecord(client.state_dict())


def _load(context: Context) -> SecAggClient:
    if STATE_KEY not in context.state.config_records:
        raise RuntimeError(
            "secure aggregation message arrived before the setup message of its session: "
            "this node holds no session state (was the ClientApp restarted mid-round?)"
        )
    return SecAggClient.from_state_dict(dict(context.state.config_records[STATE_KEY]))


def _clear(context: Context) -> None:
    context.state.config_records.pop(STATE_KEY, None)


def _reply(msg: Message, record: ConfigRecord) -> Message:
    return Message(content=RecordDict({records.CONFIG_KEY: record}), reply_to=msg)


def handle_setup(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Start a session: check its fixed-point range and reply with fresh public keys."""
    client_id, setup = records.read_setup(msg.content)
    max_weight = 1.0 if cfg.server.weighting == "uniform" else cfg.server.secagg_max_weight
    needed = clipping_range(clip_norm=cfg.server.client_clip_norm, max_weight=max_weight)
    # Under advertiser-level DP the range depends on the round's clipping norm, which
    # arrives with the train message, so the masked-input stage checks it.
    if not cfg.advertiser_dp.enabled and setup.clipping_range < needed:
        raise ValueError(
            f"the server's fixed-point range {setup.clipping_range:g} is below {needed:g}, "
            "the largest value this client may send: client and server must run the same "
            "server.norm-bound, server.max-update-norm and server.secagg-max-weight"
        )
    client = SecAggClient(client_id)
    advertise = client.setup(setup)
    _save(context, client)
    return _reply(msg, records.advertise_keys_record(advertise))


def handle_share_keys(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Secret-share this client's mask secrets among its neighbours, encrypted for each."""
    client = _load(context)
    shares = client.share_keys(records.read_public_keys(msg.content))
    _save(context, client)
    return _reply(msg, records.share_keys_record(shares))


def handle_masked_input(
    msg: Message,
    context: Context,
    cfg: RunConfig,
    *,
    train: TrainRound,
    noise_share: NoiseShare | None = None,
) -> Message:
    """Train with ``train``, then reply with the masked, clipped and weighted update delta.

    A client that declines (privacy budget) replies without a masked input, and the
    server treats it like a client that dropped after sharing its keys.

    With ``advertiser-dp.enabled``, the update is clipped to the round's clipping norm
    from the train config, weighted 1 and noised (:mod:`client.distributed_dp`). Otherwise
    ``noise_share``, when given, is applied to the clipped, weighted vector right before
    the fixed-point encoding.
    """
    client = _load(context)
    forwarded = records.read_forwarded_shares(msg.content)
    config = msg.content.config_records["config"]
    shares = None
    if cfg.advertiser_dp.enabled:
        if noise_share is not None:
            raise ValueError(
                "noise_share cannot be combined with advertiser-dp.enabled = true, which adds "
                "the advertiser-level noise share already"
            )
        # Checked before training, so a mismatched session costs no privacy budget.
        shares = round_noise_shares(cfg, config, client.session)
    outcome = train(msg, context, cfg)
    if outcome.replayed:
        outcome = _decline_replay(outcome, int(config["server-round"]))
    if outcome.release is None:
        _clear(context)
        return Message(content=decline_content(outcome), reply_to=msg)

    # The delta is measured from the adapter as received, after the wire cast, which is
    # also what the server measures the aggregate from.
    received = from_wire(record_to_arrays(msg.content.array_records["arrays"]))
    delta = {
        name: np.asarray(value, np.float64) - np.asarray(received[name], np.float64)
        for name, value in outcome.release.arrays.items()
    }
    metrics = train_metrics(outcome)
    if shares is not None:
        vector, norm = distributed_vector(
            delta,
            cfg,
            shares,
            client_id=outcome.client_id,
            server_round=int(config["server-round"]),
        )
        clip_norm = shares.clipping_norm
    else:
        weight = aggregation_weight(cfg, float(outcome.release.metrics["num-examples"]))
        clip_norm = cfg.server.client_clip_norm
        vector, norm = weighted_vector(
            delta, weight=weight, clip_norm=clip_norm, noise_share=noise_share
        )
    if norm > clip_norm:
        # Logged here only: whether an update was clipped is a fact about the private data.
        logger.info(
            "masked_input: client %s scaled its update from L2 norm %.4g to %.4g",
            outcome.client_id,
            norm,
            clip_norm,
        )
    masked = client.masked_input(forwarded, vector)
    _save(context, client)

    session, masked_array = records.masked_input_records(masked)
    content = RecordDict(
        {
            records.CONFIG_KEY: session,
            records.MASKED_INPUT_KEY: masked_array,
            "metrics": MetricRecord(metrics),
            "client": ConfigRecord({"client-id": outcome.client_id, "lora-rank": outcome.rank}),
        }
    )
    return Message(content=content, reply_to=msg)


def _decline_replay(outcome: TrainOutcome, server_round: int) -> TrainOutcome:
    """Turn a re-sent update into a decline: one update enters one session at most.

    A rerun round re-sends the stored update (:mod:`client.release`). Masked again in a
    new session whose survivors differ from the first one's, it would let a server that
    kept both sums subtract them and read one client's update. The round was counted in
    the ledger when it was first trained, so sitting the rerun out costs no budget.
    """
    reason = (
        f"client {outcome.client_id}: round {server_round} was already trained and its "
        "update may have entered an earlier secure aggregation session; masking it again "
        "in a new session could expose it to a server that subtracts the two sums, so "
        "this client sits the rerun out"
    )
    logger.warning("masked_input: %s", reason)
    return dataclasses.replace(outcome, release=None, replayed=False, decline_reason=reason)


def handle_unmask(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Reveal one share per neighbour: of its self-mask seed or of its mask key if it dropped."""
    client = _load(context)
    response = client.unmask(records.read_unmask_request(msg.content))
    _clear(context)
    return _reply(msg, records.unmask_response_record(response))
