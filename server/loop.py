"""Round loop of the ServerApp: sample, train, aggregate, evaluate, checkpoint, record."""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from tqdm.auto import tqdm

from common.adapter import (
    Arrays,
    arrays_to_record,
    get_adapter_arrays,
    payload_bytes,
    record_to_arrays,
    save_adapter,
)
from common.config import RunConfig
from common.model import build_lora_model, load_tokenizer
from server.evaluate import ServerEvaluator
from server.recorder import RunRecorder

logger = logging.getLogger(__name__)


def _split_replies(replies: list[Message]) -> tuple[list[Message], list[Message], list[str]]:
    """Separate trained replies, declined replies and errors (as log-safe strings)."""
    trained, declined, errors = [], [], []
    for reply in replies:
        if reply.has_error():
            errors.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
            continue
        metrics = reply.content["metrics"]
        if int(metrics.get("declined", 0)):
            declined.append(reply)
        else:
            trained.append(reply)
    return trained, declined, errors


def _client_id(reply: Message) -> str:
    client = reply.content.get("client")
    if client is not None and "client-id" in client:
        return str(client["client-id"])
    return f"node-{reply.metadata.src_node_id}"


def run_rounds(
    grid: Grid,
    cfg: RunConfig,
    run_dir: Path,
    *,
    evaluator_records: list | None = None,
) -> Arrays:
    """Run ``cfg.server.num_rounds`` rounds of FedAvg over the adapter; return the final one.

    After every round the global adapter is saved in PEFT format under
    ``run_dir/global_adapter``, one JSON line goes to ``metrics.jsonl`` and
    ``privacy.json`` is rewritten. Server evaluation (loss, BLEU, ROUGE-L on held-out
    records) runs every ``server.eval-every`` rounds and after the last round.
    """
    random.seed(cfg.seed)  # Flower samples nodes with the random module
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    model = build_lora_model(cfg.model, seed=cfg.seed)
    tokenizer = load_tokenizer(cfg.model.name)
    arrays = get_adapter_arrays(model)
    recorder = RunRecorder(run_dir, cfg)
    evaluator = None
    if evaluator_records:
        evaluator = ServerEvaluator(
            model,
            tokenizer,
            evaluator_records,
            num_sources=cfg.data.eval_sample,
            max_length=cfg.model.max_length,
            max_new_tokens=cfg.model.max_new_tokens,
            seed=cfg.seed,
        )
    if not cfg.privacy.dp:
        logger.warning("run: differential privacy is OFF: client updates carry no DP guarantee")

    strategy = FedAvg(
        fraction_train=cfg.server.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=cfg.server.min_train_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=cfg.server.min_available_nodes,
    )
    num_rounds = cfg.server.num_rounds
    progress = tqdm(
        range(1, num_rounds + 1),
        desc="rounds",
        unit="round",
        disable=not sys.stderr.isatty(),
    )
    for server_round in progress:
        started = time.perf_counter()

        # Sample clients and send them the global adapter.
        train_config = ConfigRecord({"num-rounds": num_rounds})
        messages = list(
            strategy.configure_train(server_round, arrays_to_record(arrays), train_config, grid)
        )
        bytes_down = payload_bytes(arrays) * len(messages)
        replies = list(grid.send_and_receive(messages, timeout=cfg.server.round_timeout))
        trained, declined, errors = _split_replies(replies)
        for error in errors:
            logger.warning("aggregate_train: round %s: reply failed (%s)", server_round, error)
        for reply in [*trained, *declined]:
            recorder.update_client(_client_id(reply), server_round, dict(reply.content["metrics"]))
        bytes_up = sum(payload_bytes(record_to_arrays(r.content["arrays"])) for r in trained)

        # Aggregate (weighted by num-examples) the replies that trained.
        train_loss = None
        if trained:
            agg_arrays, agg_metrics = strategy.aggregate_train(server_round, trained)
            if agg_arrays is not None:
                arrays = record_to_arrays(agg_arrays)
            if agg_metrics is not None:
                train_loss = float(agg_metrics["train-loss"])
        else:
            logger.warning(
                "aggregate_train: round %s: no client trained, keeping the previous adapter",
                server_round,
            )

        # Evaluate on held-out records and checkpoint the global adapter.
        eval_metrics: dict[str, float] = {}
        due = cfg.server.eval_every and (
            server_round % cfg.server.eval_every == 0 or server_round == num_rounds
        )
        if evaluator is not None and due:
            eval_metrics = evaluator(arrays)
        save_adapter(model, arrays, run_dir / "global_adapter")
        recorder.write_privacy()

        max_epsilon = recorder.max_epsilon()
        row = {
            "round": server_round,
            "num_sampled": len(messages),
            "num_replies": len(replies),
            "num_trained": len(trained),
            "num_declined": len(declined),
            "num_failed": len(errors) + max(0, len(messages) - len(replies)),
            "train_loss": train_loss,
            "eval_loss": eval_metrics.get("eval-loss"),
            "bleu": eval_metrics.get("bleu"),
            "rouge_l": eval_metrics.get("rouge-l"),
            "max_epsilon": max_epsilon,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "round_time_s": time.perf_counter() - started,
        }
        recorder.append_round(row)
        logger.info(
            "round %s/%s: sampled %s, trained %s, declined %s, failed %s | train_loss=%s "
            "eval_loss=%s bleu=%s | max_epsilon=%s | bytes up=%s down=%s | %.1fs",
            server_round,
            num_rounds,
            row["num_sampled"],
            row["num_trained"],
            row["num_declined"],
            row["num_failed"],
            _fmt(train_loss),
            _fmt(row["eval_loss"]),
            _fmt(row["bleu"]),
            _fmt(max_epsilon),
            bytes_up,
            bytes_down,
            row["round_time_s"],
        )
    return arrays


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
