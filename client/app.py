"""Flower ClientApp: DP-SGD training of the LoRA adapter on one advertiser's records.

For robustness tests and benchmarks, ``data.attack-client`` turns one simulated client
hostile: it trains as usual, then replies with its update scaled by ``data.attack-scale``
(:func:`attack_update`). The setting is off by default and logs a WARNING each round it acts.
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secagg
from client.ledger import BudgetExceeded, PrivacyEvent, PrivacyLedger
from client.outcome import TrainOutcome, decline_content, train_metrics
from client.release import Release, load_release, release_path, request_digest, save_release
from client.runtime import (
    client_identity,
    ledger_accountant,
    load_client_examples,
    load_model,
    pii_metrics,
)
from client.secagg import TrainRound
from client.train import evaluate_loss, sample_rate_for, steps_per_round, train_local
from common.adapter import (
    Arrays,
    arrays_to_record,
    from_wire,
    frozen_lora_digest,
    get_adapter_arrays,
    record_to_arrays,
    set_adapter_arrays,
    to_wire,
)
from common.config import RunConfig
from common.secagg import records
from common.secagg.update import NoiseShare

logger = logging.getLogger(__name__)


def build_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """ClientApp using ``cfg``, or the ``run_config`` Flower passes when ``cfg`` is None."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, cfg or RunConfig.from_dict(context.run_config))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, cfg or RunConfig.from_dict(context.run_config))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context, cfg or RunConfig.from_dict(context.run_config))

    register_secagg_handlers(app, cfg, train=train_round)
    return app


def register_secagg_handlers(
    app: ClientApp,
    cfg: RunConfig | None,
    *,
    train: TrainRound,
    noise_share: NoiseShare | None = None,
) -> None:
    """Add the four secure aggregation stages (``train.secagg_*``) to ``app``.

    ``train`` produces the round's update in the masked-input stage. ``noise_share``
    transforms the clipped, weighted vector before masking (None: no transform). It is
    rejected with ``advertiser-dp.enabled``, whose noise share the handler adds itself.
    """

    def run_config(context: Context) -> RunConfig:
        return cfg or RunConfig.from_dict(context.run_config)

    @app.train(records.SETUP_ACTION)
    def secagg_setup(msg: Message, context: Context) -> Message:
        return secagg.handle_setup(msg, context, run_config(context))

    @app.train(records.SHARE_KEYS_ACTION)
    def secagg_share_keys(msg: Message, context: Context) -> Message:
        return secagg.handle_share_keys(msg, context, run_config(context))

    @app.train(records.MASKED_INPUT_ACTION)
    def secagg_masked_input(msg: Message, context: Context) -> Message:
        return secagg.handle_masked_input(
            msg, context, run_config(context), train=train, noise_share=noise_share
        )

    @app.train(records.UNMASK_ACTION)
    def secagg_unmask(msg: Message, context: Context) -> Message:
        return secagg.handle_unmask(msg, context, run_config(context))


def client_rank(cfg: RunConfig, context: Context) -> int:
    """LoRA rank of this client.

    ``lora-rank`` from the node config wins; else ``model.client-ranks`` is assigned
    round-robin by ``partition-id``; else every client uses ``model.lora-r``.
    """
    node_config = context.node_config
    if "lora-rank" in node_config:
        rank = node_config["lora-rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(
                f"invalid node config lora-rank = {rank!r}: expected an integer >= 1, "
                'e.g. --node-config "lora-rank=8"'
            )
        return rank
    ranks = cfg.model.rank_list
    if not ranks:
        return cfg.model.lora_r
    if "partition-id" not in node_config:
        raise ValueError(
            f"model.client-ranks = {cfg.model.client_ranks!r} assigns ranks by partition-id, "
            'and this node has none: start the SuperNode with --node-config "lora-rank=R"'
        )
    return ranks[int(node_config["partition-id"]) % len(ranks)]


def rank_config(cfg: RunConfig, rank: int) -> RunConfig:
    """``cfg`` with ``model.lora-r`` set to ``rank`` (the config the local model is built from)."""
    return cfg if rank == cfg.model.lora_r else cfg.replace(model={"lora_r": rank})


def handle_query(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Reply with this client's id and LoRA rank, which the server needs before sampling."""
    client = ConfigRecord(
        {"client-id": client_identity(context), "lora-rank": client_rank(cfg, context)}
    )
    return Message(content=RecordDict({"client": client}), reply_to=msg)


def _config_number(config: ConfigRecord, key: str, default: float | None = None) -> float:
    """Number ``key`` of a train message's config (``default`` when absent, if given)."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"invalid train config {key} = {value!r}: expected a number")
    return float(value)


def _check_frozen_lora(model, config: ConfigRecord) -> None:
    """Raise ValueError if the server's FFA-LoRA digest differs from this model's ``lora_A``."""
    expected = config.get("lora-a-digest")
    if expected is None:
        return
    found = frozen_lora_digest(model)
    if found != expected:
        raise ValueError(
            f"frozen lora_A differs from the server's (digest {found[:12]} != "
            f"{str(expected)[:12]}): FFA-LoRA needs the same seed, model, torch and PEFT "
            "versions on the server and every client"
        )


def planned_rounds(cfg: RunConfig) -> int:
    """Rounds a client's noise is calibrated for: ``privacy.planned-rounds``, at most all."""
    return min(cfg.privacy.planned_rounds or cfg.server.num_rounds, cfg.server.num_rounds)


def ledger_path(cfg: RunConfig, context: Context, client_id: str) -> Path:
    """Ledger file of this client: ``ledger-dir`` from the node config, else the run config."""
    folder = context.node_config.get("ledger-dir") or cfg.privacy.ledger_dir
    if not folder:
        folder = str(Path(cfg.output or ".") / "ledgers")
    return Path(str(folder)) / f"{client_id}.json"


def attack_scale_for(cfg: RunConfig, context: Context) -> float | None:
    """Return the factor this client scales its update by, or None for an honest client.

    Only the simulated client whose ``partition-id`` equals ``data.attack-client`` is
    hostile. A node without a partition id raises ValueError while the attack is on,
    because the setting exists for simulations only.
    """
    attack_client = cfg.data.attack_client
    if attack_client < 0:
        return None
    node_config = context.node_config
    if "partition-id" not in node_config:
        raise ValueError(
            f"data.attack-client = {attack_client} picks a hostile simulated client by "
            "partition-id, and this node has none: set data.attack-client = -1 outside "
            "simulations"
        )
    if int(node_config["partition-id"]) != attack_client:
        return None
    return cfg.data.attack_scale


def attack_update(sent: Arrays, trained: Arrays, *, scale: float) -> Arrays:
    """Return ``sent + scale * (trained - sent)``, the reply of a client that scales its update.

    ``sent`` is the adapter the server sent (float32), ``trained`` the adapter after local
    training. With a large ``scale``, this one update outweighs all honest ones in a mean.
    """
    return {
        name: (sent[name] + np.float32(scale) * (value - sent[name])).astype(np.float32)
        for name, value in trained.items()
    }


def handle_train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Train one round and reply with the update, or decline if it would pass the budget."""
    outcome = train_round(msg, context, cfg)
    if outcome.release is None:
        return Message(content=decline_content(outcome), reply_to=msg)
    content = RecordDict(
        {
            "arrays": arrays_to_record(to_wire(outcome.release.arrays, outcome.wire_dtype)),
            "metrics": MetricRecord(train_metrics(outcome)),
            "client": ConfigRecord({"client-id": outcome.client_id, "lora-rank": outcome.rank}),
        }
    )
    return Message(content=content, reply_to=msg)


def train_round(msg: Message, context: Context, cfg: RunConfig) -> TrainOutcome:
    """Train one round, unless the round would exceed this client's privacy budget.

    A round already released and counted for the same request is returned again
    (``replayed``) without training.
    """
    started = time.perf_counter()
    config = msg.content.config_records["config"]
    server_round = int(_config_number(config, "server-round"))
    proximal_mu = _config_number(config, "proximal-mu", 0.0)
    wire_dtype = str(config.get("wire-dtype", cfg.server.wire_dtype))
    client_id = client_identity(context)
    rank = client_rank(cfg, context)
    examples, pad_token_id = load_client_examples(cfg, context)
    model = load_model(rank_config(cfg, rank))
    _check_frozen_lora(model, config)
    received = record_to_arrays(msg.content.array_records["arrays"])
    set_adapter_arrays(model, received)
    hostile_scale = attack_scale_for(cfg, context)

    num_examples = len(examples)
    steps = steps_per_round(num_examples, cfg.train.batch_size, cfg.train.local_epochs)
    sample_rate = sample_rate_for(num_examples, cfg.train.batch_size)
    noise_multiplier = 0.0
    ledger = None
    if cfg.privacy.dp:
        ledger = PrivacyLedger.open(
            ledger_path(cfg, context, client_id),
            client_id=client_id,
            accountant=ledger_accountant(cfg.privacy),
            target_epsilon=cfg.privacy.target_epsilon,
            target_delta=cfg.privacy.target_delta,
        )
        noise_multiplier = ledger.calibrate(
            sample_rate=sample_rate,
            planned_steps=steps * planned_rounds(cfg),
        )
        # A round whose update was released and counted, requested again with the same message
        # after a server restart, gets the same update back at no new privacy cost.
        release = load_release(release_path(ledger.path))
        if (
            release is not None
            and release.server_round == server_round
            and server_round in ledger.rounds_joined
            and release.request_digest == request_digest(msg)
        ):
            logger.info(
                "train: client %s re-sends its round %s update, already counted in its ledger",
                client_id,
                server_round,
            )
            return TrainOutcome(client_id, rank, wire_dtype, ledger, release, replayed=True)
        # The check uses this round's own q, the one the ledger will record: a client whose
        # record count fell since σ was calibrated samples at a higher rate than planned.
        if ledger.sample_rate is not None and sample_rate > ledger.sample_rate:
            logger.warning(
                "train: client %s now samples at rate %.4g, above the %.4g its noise was "
                "calibrated for (fewer records than when its ledger began): epsilon grows "
                "faster than planned",
                client_id,
                sample_rate,
                ledger.sample_rate,
            )
        event = PrivacyEvent(noise_multiplier, sample_rate, steps)
        try:
            ledger.check_budget(event)
        except BudgetExceeded as err:
            logger.warning("train: %s", err)
            if server_round not in ledger.declined_rounds:
                ledger.record_decline(server_round)
            return TrainOutcome(client_id, rank, wire_dtype, ledger, decline_reason=str(err))

    result = train_local(
        model,
        examples,
        train=cfg.train,
        privacy=cfg.privacy,
        noise_multiplier=noise_multiplier,
        pad_token_id=pad_token_id,
        seed=zlib.crc32(f"{cfg.seed}:{client_id}:{server_round}".encode()),
        steps=steps,
        proximal_mu=proximal_mu,
    )
    metrics: dict[str, float | int] = {
        "num-examples": result.num_examples,
        "train-loss": result.train_loss,
        "steps": result.steps,
        "declined": 0,
        "train-time-s": time.perf_counter() - started,
        "secure-mode": int(result.secure_mode),
        **pii_metrics(cfg, context),
    }
    trained = get_adapter_arrays(model)
    if hostile_scale is not None:
        logger.warning(
            "train: client %s is hostile (data.attack-client, a test setting): it replies "
            "with its round %s update scaled by %g",
            client_id,
            server_round,
            hostile_scale,
        )
        trained = attack_update(from_wire(received), trained, scale=hostile_scale)
    release = Release(server_round, request_digest(msg), trained, metrics)
    if ledger is not None:
        ledger.record_round(
            server_round, PrivacyEvent(noise_multiplier, result.sample_rate, result.steps)
        )
        # Stored only once the event is in the ledger, so a stored update is always counted.
        save_release(release_path(ledger.path), release)
    return TrainOutcome(client_id, rank, wire_dtype, ledger, release)


def handle_evaluate(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Loss of the received adapter on this client's records.

    NOTE: this loss is computed on private records without noise, so it is not covered by
    the DP guarantee; the server only requests it when ``server.fraction-evaluate > 0``.
    """
    examples, pad_token_id = load_client_examples(cfg, context)
    model = load_model(rank_config(cfg, client_rank(cfg, context)))
    set_adapter_arrays(model, record_to_arrays(msg.content.array_records["arrays"]))
    loss = evaluate_loss(model, examples[:256], pad_token_id=pad_token_id)
    metrics = MetricRecord({"eval-loss": loss, "num-examples": min(256, len(examples))})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


app = build_client_app()

__all__ = ["ArrayRecord", "app", "build_client_app"]
