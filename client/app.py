"""Flower ClientApp: DP-SGD training of the LoRA adapter on one advertiser's records."""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.ledger import BudgetExceeded, PrivacyEvent, PrivacyLedger
from client.runtime import client_identity, load_client_examples, load_model
from client.train import evaluate_loss, sample_rate_for, steps_per_round, train_local
from common.adapter import (
    arrays_to_record,
    get_adapter_arrays,
    record_to_arrays,
    set_adapter_arrays,
)
from common.config import RunConfig

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

    return app


def ledger_path(cfg: RunConfig, context: Context, client_id: str) -> Path:
    """Ledger file of this client: ``ledger-dir`` from the node config, else the run config."""
    folder = context.node_config.get("ledger-dir") or cfg.privacy.ledger_dir
    if not folder:
        folder = str(Path(cfg.output or ".") / "ledgers")
    return Path(str(folder)) / f"{client_id}.json"


def handle_train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Train one round, unless the round would exceed this client's privacy budget."""
    started = time.perf_counter()
    server_round = int(msg.content["config"]["server-round"])
    client_id = client_identity(context)
    examples, pad_token_id = load_client_examples(cfg, context)
    model = load_model(cfg)
    set_adapter_arrays(model, record_to_arrays(msg.content["arrays"]))

    num_examples = len(examples)
    steps = steps_per_round(num_examples, cfg.train.batch_size, cfg.train.local_epochs)
    sample_rate = sample_rate_for(num_examples, cfg.train.batch_size)
    noise_multiplier = 0.0
    ledger = None
    if cfg.privacy.dp:
        ledger = PrivacyLedger.open(
            ledger_path(cfg, context, client_id),
            client_id=client_id,
            accountant=cfg.privacy.accountant,
            target_epsilon=cfg.privacy.target_epsilon,
            target_delta=cfg.privacy.target_delta,
        )
        noise_multiplier = ledger.calibrate(
            sample_rate=sample_rate, planned_steps=steps * cfg.server.num_rounds
        )
        event = PrivacyEvent(noise_multiplier, float(ledger.sample_rate or sample_rate), steps)
        try:
            ledger.check_budget(event)
        except BudgetExceeded as err:
            logger.warning("train: %s", err)
            ledger.record_decline(server_round)
            return _decline_reply(msg, ledger, str(err))

    result = train_local(
        model,
        examples,
        train=cfg.train,
        privacy=cfg.privacy,
        noise_multiplier=noise_multiplier,
        pad_token_id=pad_token_id,
        seed=zlib.crc32(f"{cfg.seed}:{client_id}:{server_round}".encode()),
        steps=steps,
    )
    metrics: dict[str, float | int] = {
        "num-examples": result.num_examples,
        "train-loss": result.train_loss,
        "steps": result.steps,
        "declined": 0,
        "train-time-s": time.perf_counter() - started,
    }
    if ledger is not None:
        epsilon = ledger.record_round(
            server_round, PrivacyEvent(noise_multiplier, result.sample_rate, result.steps)
        )
        metrics.update(_privacy_metrics(ledger, epsilon))
    content = RecordDict(
        {
            "arrays": arrays_to_record(get_adapter_arrays(model)),
            "metrics": MetricRecord(metrics),
            "client": ConfigRecord({"client-id": client_id}),
        }
    )
    return Message(content=content, reply_to=msg)


def _privacy_metrics(ledger: PrivacyLedger, epsilon: float) -> dict[str, float | int]:
    return {
        "epsilon": epsilon,
        "delta": ledger.target_delta,
        "noise-multiplier": float(ledger.noise_multiplier or 0.0),
        "sample-rate": float(ledger.sample_rate or 0.0),
        "total-steps": ledger.steps,
    }


def _decline_reply(msg: Message, ledger: PrivacyLedger, reason: str) -> Message:
    metrics = {"num-examples": 0, "declined": 1, **_privacy_metrics(ledger, ledger.epsilon())}
    content = RecordDict(
        {
            "metrics": MetricRecord(metrics),
            "client": ConfigRecord({"client-id": ledger.client_id, "decline-reason": reason}),
        }
    )
    return Message(content=content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Loss of the received adapter on this client's records.

    NOTE: this loss is computed on private records without noise, so it is not covered by
    the DP guarantee; the server only asks for it when ``server.fraction-evaluate > 0``.
    """
    examples, pad_token_id = load_client_examples(cfg, context)
    model = load_model(cfg)
    set_adapter_arrays(model, record_to_arrays(msg.content["arrays"]))
    loss = evaluate_loss(model, examples[:256], pad_token_id=pad_token_id)
    metrics = MetricRecord({"eval-loss": loss, "num-examples": min(256, len(examples))})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


app = build_client_app()

__all__ = ["ArrayRecord", "app", "build_client_app"]
