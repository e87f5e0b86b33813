"""The server's side of one round with the nodes: discovery, sampling, messages, replies."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common.adapter import arrays_to_record, payload_bytes, record_bytes, record_to_arrays, to_wire
from common.config import RunConfig
from server.aggregation import ClientUpdate, GlobalAdapter

logger = logging.getLogger(__name__)

# Seconds between two looks at the connected nodes while fewer than min-available-nodes.
_NODE_POLL_S = 1.0


@dataclass(frozen=True)
class Node:
    """A connected SuperNode and what it reported when first asked."""

    node_id: int
    client_id: str
    rank: int


# ---------------------------------------------------------------------------
# Node discovery and sampling
# ---------------------------------------------------------------------------


def discover_nodes(grid: Grid, known: dict[int, Node], cfg: RunConfig) -> list[Node]:
    """Return the connected nodes that reported their client id and rank, by client id.

    Waits until ``server.min-available-nodes`` nodes are connected, then sends a query
    message to each node not in ``known`` and adds the ones that reply to it. Sampling
    over client ids, not Flower's node ids, keeps the sample the same after a restart
    (node ids are new in every simulation).
    """
    while len(node_ids := sorted(grid.get_node_ids())) < cfg.server.min_available_nodes:
        logger.info(
            "configure_train: waiting for nodes: %s connected, %s required",
            len(node_ids),
            cfg.server.min_available_nodes,
        )
        time.sleep(_NODE_POLL_S)

    unknown = [node_id for node_id in node_ids if node_id not in known]
    if unknown:
        messages = [
            Message(RecordDict({"config": ConfigRecord({})}), node_id, MessageType.QUERY)
            for node_id in unknown
        ]
        for reply in grid.send_and_receive(messages, timeout=cfg.server.round_timeout):
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                logger.warning("query: node %s failed: %s", node_id, reply.error.reason)
                continue
            try:
                client = reply.content.config_records["client"]
                node = Node(node_id, str(client["client-id"]), int(as_number(client["lora-rank"])))
            except (KeyError, TypeError, ValueError) as err:
                logger.warning("query: node %s sent a malformed reply (%r)", node_id, err)
                continue
            # A second connected node with the same client id could double that client's
            # weight, so it is left out (and asked again next round) while the first is there.
            claimed = {known[n].client_id: n for n in node_ids if n in known}
            if node.client_id in claimed:
                logger.warning(
                    "query: node %s reports client id %s, which node %s already uses: "
                    "not sampling it",
                    node_id,
                    node.client_id,
                    claimed[node.client_id],
                )
                continue
            known[node_id] = node
    return sorted(
        (known[node_id] for node_id in node_ids if node_id in known),
        key=lambda node: node.client_id,
    )


def sample_nodes(nodes: Sequence[Node], cfg: RunConfig, sampler: random.Random) -> list[Node]:
    """Sample ``fraction-train`` of ``nodes`` (at least ``min-train-nodes``), by client id."""
    size = max(int(len(nodes) * cfg.server.fraction_train), cfg.server.min_train_nodes)
    sampled = sampler.sample(list(nodes), min(size, len(nodes)))
    return sorted(sampled, key=lambda node: node.client_id)


def servable_nodes(nodes: list[Node], strategy: GlobalAdapter, warned: set[int]) -> list[Node]:
    """Drop nodes whose rank this run cannot serve, warning once per node."""
    ranks = strategy.ranks()
    for node in nodes:
        if node.rank not in ranks and node.node_id not in warned:
            warned.add(node.node_id)
            logger.warning(
                "configure_train: client %s (node %s) reports lora-rank %s, but this run "
                "serves ranks %s (model.lora-r, model.client-ranks): not sampling it",
                node.client_id,
                node.node_id,
                node.rank,
                list(ranks),
            )
    return [node for node in nodes if node.rank in ranks]


# ---------------------------------------------------------------------------
# One round's messages and replies
# ---------------------------------------------------------------------------


def train_messages(
    nodes: Sequence[Node],
    strategy: GlobalAdapter,
    config: ConfigRecord,
    wire_dtype: str,
    *,
    message_type: str = MessageType.TRAIN,
) -> tuple[list[Message], int]:
    """One train message per node, carrying the adapter of its rank; return them and bytes."""
    adapters = strategy.client_adapters(node.rank for node in nodes)
    records: dict[int, ArrayRecord] = {}
    sizes: dict[int, int] = {}
    for rank, adapter in adapters.items():
        wire = to_wire(adapter, wire_dtype)
        records[rank] = arrays_to_record(wire)
        sizes[rank] = payload_bytes(wire)
    messages = [
        Message(
            RecordDict({"arrays": records[node.rank], "config": config}),
            node.node_id,
            message_type,
        )
        for node in nodes
    ]
    return messages, sum(sizes[node.rank] for node in nodes)


@dataclass
class RoundReplies:
    """A round's replies, sorted out: updates to aggregate, declines and failures."""

    updates: list[ClientUpdate]
    declined: list[tuple[str, dict]]
    trained_metrics: dict[str, dict]
    failures: list[str]
    bytes_up: int


@dataclass
class RoundResult:
    """Outcome of one training round, plain or under secure aggregation, for the metrics row.

    ``extra`` contains row entries of one mode only (e.g. the secure aggregation error bound).
    """

    replies: RoundReplies
    num_sampled: int
    num_replies: int
    accepted: tuple[str, ...]
    num_rejected: int
    applied: bool
    bytes_down: int
    extra: dict = field(default_factory=dict)


def sort_replies(
    replies: Sequence[Message], sent: Sequence[Node], server_round: int
) -> RoundReplies:
    """Sort replies into updates, declines and failures; log every failure and lost client.

    The client id and rank come from the node registry, never from the reply, so a
    client cannot pass its update off as another's.
    """
    by_node = {node.node_id: node for node in sent}
    result = RoundReplies([], [], {}, [], 0)
    answered: set[int] = set()
    for reply in replies:
        node = by_node.get(reply.metadata.src_node_id)
        if node is None:
            continue
        answered.add(node.node_id)
        if reply.has_error():
            result.failures.append(f"client {node.client_id}: {reply.error.reason}")
            continue
        try:
            metrics = dict(reply.content.metric_records["metrics"])
            if as_number(metrics.get("declined", 0)):
                result.declined.append((node.client_id, metrics))
                continue
            record = reply.content.array_records["arrays"]
            arrays = record_to_arrays(record)
            update = ClientUpdate(
                client_id=node.client_id,
                arrays=arrays,
                num_examples=as_number(metrics["num-examples"]),
                rank=node.rank,
                wire_bytes=record_bytes(record),
            )
        except (KeyError, TypeError, ValueError) as err:
            result.failures.append(f"client {node.client_id}: malformed reply ({err!r})")
            continue
        result.updates.append(update)
        result.trained_metrics[node.client_id] = metrics
        result.bytes_up += payload_bytes(arrays)
    for node in sent:
        if node.node_id not in answered:
            result.failures.append(f"client {node.client_id}: no reply within the round timeout")
    for failure in result.failures:
        logger.warning("aggregate_train: round %s: %s", server_round, failure)
    return result


def as_number(value: object) -> float:
    """A metric or config value that must be a number; TypeError names what it was."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def weighted_train_loss(metrics: dict[str, dict], client_ids: Sequence[str]) -> float | None:
    """Training loss of the accepted clients, weighted by example count; None without one."""
    pairs = []
    for client_id in client_ids:
        loss = metrics[client_id].get("train-loss")
        if isinstance(loss, (int, float)) and np.isfinite(loss):
            pairs.append((as_number(metrics[client_id]["num-examples"]), float(loss)))
    total = sum(weight for weight, _ in pairs)
    return sum(weight * loss for weight, loss in pairs) / total if total > 0 else None
