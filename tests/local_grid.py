"""A Flower Grid that runs a ClientApp in the test process, for driving the round loop.

Messages go straight to ``ClientApp.__call__`` with one persistent ``Context`` per node,
as Flower's simulation engine does, but without Ray or serialization. Test clients can
fail (no reply, as after a round timeout) and the grid can stop the server after a
given round's replies arrived, as a crash would.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.app import handle_query, handle_train, register_secagg_handlers
from client.outcome import TrainOutcome
from client.release import Release
from client.runtime import client_identity
from common.adapter import arrays_to_record, from_wire, record_to_arrays, to_wire
from common.config import RunConfig
from common.secagg import records

# Secure aggregation actions in the order the server sends them.
SECAGG_ACTIONS = (
    records.SETUP_ACTION,
    records.SHARE_KEYS_ACTION,
    records.MASKED_INPUT_ACTION,
    records.UNMASK_ACTION,
)


class ServerStopped(RuntimeError):
    """Raised by :class:`LocalGrid` to stop the server after the chosen round."""


class LocalGrid(Grid):
    """Deliver messages to ``client_app`` in this process.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs.
    num_nodes : int
        Nodes with partition ids ``0 .. num_nodes - 1``.
    node_id_offset : int
        Node ids are ``offset + 7919 * (num_nodes - partition_id)``, so they are not in
        partition order, and another offset gives a restarted federation new node ids.
    silent : set of int
        Partition ids that never reply to train messages (lost or too slow).
    stop_after_round : int or None
        Raise :class:`ServerStopped` once the clients replied to this round.
    stop_after_action : str or None
        With ``stop_after_round``, stop only after the replies to this round's messages of
        this secure aggregation action (e.g. ``records.MASKED_INPUT_ACTION``).
    node_configs : mapping of int to dict
        Extra node config entries by partition id (e.g. ``lora-rank``).
    dropouts : mapping of int to str
        Partition id to the secure aggregation action (e.g. ``"secagg_masked_input"``)
        from which that node stops replying, as a client that vanished mid-round.
    dropout_rounds : collection of int or None
        Rounds in which ``dropouts`` apply, counted by setup messages; None: every round.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        node_id_offset: int = 1000,
        silent: Iterable[int] = (),
        stop_after_round: int | None = None,
        stop_after_action: str | None = None,
        on_message: Callable[[Message], None] | None = None,
        node_configs: Mapping[int, dict] | None = None,
        dropouts: Mapping[int, str] | None = None,
        dropout_rounds: Collection[int] | None = None,
    ) -> None:
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0
        self.client_app = client_app
        self.silent = set(silent)
        self.stop_after_round = stop_after_round
        self.stop_after_action = stop_after_action
        self.on_message = on_message
        self.partitions = {
            node_id_offset + 7919 * (num_nodes - pid): pid for pid in range(num_nodes)
        }
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config={
                    "partition-id": pid,
                    "num-partitions": num_nodes,
                    **(node_configs or {}).get(pid, {}),
                },
                state=RecordDict(),
                run_config={},
            )
            for node_id, pid in self.partitions.items()
        }
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.dropouts = dict(dropouts or {})
        self.dropout_rounds = None if dropout_rounds is None else set(dropout_rounds)
        self.secagg_round = 0

    def set_run(self, run) -> None:  # pragma: no cover - not used by the round loop
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover - not used by the round loop
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.partitions)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def _dropped(self, partition_id: int, message_type: str) -> bool:
        """Whether the node has vanished by the secure aggregation stage of ``message_type``."""
        action = message_type.partition(".")[2]
        if partition_id not in self.dropouts or action not in SECAGG_ACTIONS:
            return False
        if self.dropout_rounds is not None and self.secagg_round not in self.dropout_rounds:
            return False
        return SECAGG_ACTIONS.index(action) >= SECAGG_ACTIONS.index(self.dropouts[partition_id])

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        replies = []
        server_round = None
        messages = list(messages)
        if any(m.metadata.message_type == f"train.{SECAGG_ACTIONS[0]}" for m in messages):
            self.secagg_round += 1
        for message in messages:
            self.sent.append(message)
            if self.on_message is not None:
                self.on_message(message)
            node_id = message.metadata.dst_node_id
            message_type = message.metadata.message_type
            if self._dropped(self.partitions[node_id], message_type):
                continue
            if "config" in message.content and message_type.startswith("train"):
                server_round = int(message.content["config"]["server-round"])
                if self.partitions[node_id] in self.silent:
                    continue
            try:
                replies.append(self.client_app(message, self.contexts[node_id]))
            except Exception as err:  # noqa: BLE001 - Flower turns any ClientApp error into an error reply
                replies.append(Message(Error(code=0, reason=repr(err)), reply_to=message))
        self.replies.extend(replies)
        action_done = self.stop_after_action is None or any(
            m.metadata.message_type == f"train.{self.stop_after_action}" for m in messages
        )
        if server_round is not None and server_round == self.stop_after_round and action_done:
            raise ServerStopped(f"server stopped after round {server_round} replies")
        return replies


# A transformation a test client applies to its honest update before sending it; it may
# also raise to make the client fail.
Behaviour = Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], dict[str, np.ndarray]]


def synthetic_client_app(
    cfg: RunConfig,
    *,
    behaviours: Mapping[int, Behaviour] | None = None,
    replies: dict[tuple[int, int], dict[str, np.ndarray]] | None = None,
) -> ClientApp:
    """ClientApp that speaks the fedads protocol but trains by adding a seeded step.

    The real :func:`client.app.handle_query` replies to queries, and the real secure
    aggregation handlers mask the same synthetic update. A train message's
    adapter comes back as ``received + 0.01 * N(0, 1)`` (seeded by partition id and
    round), cast to the requested wire dtype, with ``num-examples = 10 + partition id``.
    ``behaviours[partition_id]`` turns the honest update into a hostile one or raises;
    ``replies[(partition_id, round)]`` collects what each client sent, in float32.
    """
    app = ClientApp()
    behaviours = dict(behaviours or {})

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context, cfg)

    def synthetic_update(msg: Message, context: Context) -> dict[str, np.ndarray]:
        partition_id = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        received = from_wire(record_to_arrays(msg.content.array_records["arrays"]))
        rng = np.random.default_rng([partition_id, server_round])
        update = {
            name: value + 0.01 * rng.standard_normal(value.shape).astype(np.float32)
            for name, value in sorted(received.items())
        }
        if partition_id in behaviours:
            update = behaviours[partition_id](update, received)
        return update

    def train_round(msg: Message, context: Context, run_cfg: RunConfig) -> TrainOutcome:
        update = synthetic_update(msg, context)
        partition_id = int(context.node_config["partition-id"])
        if replies is not None:
            replies[(partition_id, int(msg.content["config"]["server-round"]))] = update
        metrics = {"num-examples": 10 + partition_id, "train-loss": 1.0, "declined": 0}
        release = Release(0, "", update, metrics)
        return TrainOutcome(client_identity(context), cfg.model.lora_r, "float32", None, release)

    register_secagg_handlers(app, cfg, train=train_round)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        partition_id = int(context.node_config["partition-id"])
        server_round = int(config["server-round"])
        update = synthetic_update(msg, context)
        # Honest tensors travel in the wire dtype; a hostile dtype is sent as it is.
        wire = {
            name: to_wire({name: value}, str(config["wire-dtype"]))[name]
            if value.dtype == np.float32
            else value
            for name, value in update.items()
        }
        if replies is not None:
            replies[(partition_id, server_round)] = from_wire(wire)
        metrics = MetricRecord(
            {"num-examples": 10 + partition_id, "train-loss": 1.0, "declined": 0}
        )
        content = RecordDict(
            {
                "arrays": arrays_to_record(wire),
                "metrics": metrics,
                "client": ConfigRecord({"client-id": client_identity(context)}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def wrapped_client_app(cfg: RunConfig, behaviours: Mapping[int, Behaviour]) -> ClientApp:
    """The fedads ClientApp, except that the partitions in ``behaviours`` tamper with updates.

    A tampering client trains for real, then sends ``behaviour(update, received)`` (float32
    tensors, cast back to the wire dtype) instead of its update, or fails if it raises.
    """
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context, cfg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = handle_train(msg, context, cfg)
        behaviour = behaviours.get(int(context.node_config["partition-id"]))
        if behaviour is None:
            return reply
        received = from_wire(record_to_arrays(msg.content.array_records["arrays"]))
        update = from_wire(record_to_arrays(reply.content.array_records["arrays"]))
        tampered = behaviour(update, received)
        reply.content["arrays"] = arrays_to_record(
            to_wire(tampered, str(msg.content["config"]["wire-dtype"]))
        )
        return reply

    return app


def nan_update(update: dict[str, np.ndarray], received: dict[str, np.ndarray]) -> dict:
    """Hostile behaviour: one NaN in the first tensor."""
    name = min(update)
    update[name] = update[name].copy()
    update[name].flat[0] = np.nan
    return update


def crash(update: dict[str, np.ndarray], received: dict[str, np.ndarray]) -> dict:
    """Failing behaviour: the client raises instead of replying."""
    raise RuntimeError("client crashed while training")


def dp_run_config(
    run_dir, data_dir, *, num_clients: int, num_rounds: int, server: Mapping | None = None
) -> RunConfig:
    """Config of a small real DP run: 16 records per client, one DP-SGD step per round.

    ``server`` entries (kebab-case keys) are added to the ``[server]`` section.
    """
    from simulations.run import prepare_run

    cfg = RunConfig.from_dict(
        {
            "seed": 0,
            "output": str(run_dir),
            "data": {
                "data-dir": str(data_dir),
                "num-clients": num_clients,
                "max-examples-per-client": 16,
            },
            "train": {"batch-size": 8, "local-epochs": 0.5},
            "privacy": {"accountant": "rdp"},
            "server": {"num-rounds": num_rounds, "eval-every": 0, **(server or {})},
        }
    )
    return prepare_run(cfg)
