"""Round loop of the ServerApp: sample, train, validate and aggregate, evaluate, checkpoint."""

from __future__ import annotations

import dataclasses
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from tqdm.auto import tqdm

from common.adapter import (
    Arrays,
    frozen_lora_digest,
    get_adapter_arrays,
    save_adapter,
)
from common.config import RunConfig
from common.model import build_lora_model, load_tokenizer
from server.aggregation import GlobalAdapter, build_global_adapter
from server.central_dp import RoundSampling
from server.checkpoint import (
    Checkpoint,
    capture_rng,
    config_differences,
    drop_rounds_after,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from server.evaluate import ServerEvaluator
from server.nodes import (
    Node,
    RoundResult,
    discover_nodes,
    sample_nodes,
    servable_nodes,
    sort_replies,
    train_messages,
    weighted_train_loss,
)
from server.recorder import ClientPrivacy, RunRecorder
from server.secure_round import run_secure_round
from server.warm_start import describe as describe_warm_start
from server.warm_start import warm_start_adapter

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------


def _resume(
    checkpoint: Checkpoint,
    cfg: RunConfig,
    strategy: GlobalAdapter,
    recorder: RunRecorder,
    sampler: random.Random,
) -> None:
    # Parsing the saved config fills keys added since it was written with their defaults.
    saved = RunConfig.from_dict(checkpoint.config).to_dict()
    differing = config_differences(saved, cfg.to_dict())
    if differing:
        raise ValueError(
            f"the run folder {recorder.run_dir} contains a checkpoint of another config "
            f"(differing keys: {', '.join(differing[:6])}): resume with the run's own "
            "config.toml, or pass a new output folder to start a new run"
        )
    strategy.load_state(checkpoint.global_state, checkpoint.optimizer_state)
    if strategy.advertiser_dp is not None:
        if not checkpoint.advertiser_dp:
            raise ValueError(
                f"the checkpoint in {recorder.run_dir} has no advertiser-dp state although "
                "advertiser-dp.enabled = true: resume with the run's own config.toml"
            )
        strategy.advertiser_dp.load_state_dict(checkpoint.advertiser_dp)
    restore_rng(checkpoint.rng, sampler)
    fields = {f.name for f in dataclasses.fields(ClientPrivacy)}
    recorder.clients = {
        client_id: ClientPrivacy(**{k: v for k, v in entry.items() if k in fields})
        for client_id, entry in checkpoint.clients.items()
    }
    dropped = drop_rounds_after(recorder.metrics_path, checkpoint.server_round)
    logger.info(
        "resume: continuing after round %s of %s (strategy %s); dropped %s metrics lines "
        "of a round that had no checkpoint",
        checkpoint.server_round,
        cfg.server.num_rounds,
        checkpoint.strategy,
        dropped,
    )


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def run_rounds(
    grid: Grid,
    cfg: RunConfig,
    run_dir: Path,
    *,
    evaluator_records: list | None = None,
) -> Arrays:
    """Run rounds up to ``cfg.server.num_rounds``; return the final global adapter.

    When ``run_dir/checkpoint`` exists, the run continues after its round, with the
    global state, optimizer state, generator states and privacy bookkeeping it holds.
    After every round the global adapter is saved in PEFT format under
    ``run_dir/global_adapter``, one JSON line goes to ``metrics.jsonl``,
    ``privacy.json`` is rewritten and the checkpoint is replaced, in that order. Server
    evaluation (loss, BLEU, ROUGE-L on held-out records) runs every
    ``server.eval-every`` rounds and after the last round.
    """
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    sampler = random.Random(cfg.seed)

    model = build_lora_model(
        dataclasses.replace(cfg.model, lora_r=cfg.model.max_rank), seed=cfg.seed
    )
    # The warm start, when configured, leaves its adapter in the model (see warm_start).
    warm = warm_start_adapter(cfg, model, run_dir)
    strategy = build_global_adapter(get_adapter_arrays(model), cfg)
    recorder = RunRecorder(
        run_dir,
        cfg,
        advertiser_dp=strategy.advertiser_dp,
        warm_start=None if warm is None else describe_warm_start(warm[1]),
    )
    evaluator = None
    if evaluator_records:
        evaluator = ServerEvaluator(
            model,
            load_tokenizer(cfg.model.name),
            evaluator_records,
            num_sources=cfg.data.eval_sample,
            max_length=cfg.model.max_length,
            max_new_tokens=cfg.model.max_new_tokens,
            seed=cfg.seed,
        )
    if not cfg.privacy.dp and not cfg.advertiser_dp.enabled:
        logger.warning("run: differential privacy is OFF: client updates carry no DP guarantee")
    elif not cfg.privacy.dp:
        logger.warning(
            "run: record-level DP is OFF: only the server's advertiser-level DP protects the "
            "global adapter, and each client's update reaches the server without noise"
        )
    if cfg.server.secure_aggregation:
        logger.info(
            "run: secure aggregation on: per-client validation moved to clients, which clip "
            "their update to L2 norm %g; the server checks only the unmasked mean",
            cfg.server.client_clip_norm,
        )
    else:
        logger.info("run: secure aggregation off: the server receives each client's update")

    start_round = 1
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is not None:
        _resume(checkpoint, cfg, strategy, recorder, sampler)
        start_round = checkpoint.server_round + 1
        if start_round > cfg.server.num_rounds:
            logger.info(
                "resume: all %s rounds of %s are done, nothing to run; pass a new output "
                "folder to start a new run",
                cfg.server.num_rounds,
                run_dir,
            )

    server = cfg.server
    base_config: dict = {
        "num-rounds": server.num_rounds,
        "wire-dtype": server.wire_dtype,
        **strategy.optimizer.client_config(),
    }
    if cfg.model.ffa_lora:
        base_config["lora-a-digest"] = frozen_lora_digest(model)
    known: dict[int, Node] = {}
    warned: set[int] = set()
    progress = tqdm(
        range(start_round, server.num_rounds + 1),
        desc="rounds",
        unit="round",
        disable=not sys.stderr.isatty(),
    )
    for server_round in progress:
        started = time.perf_counter()

        # Sample clients and send each the global adapter at its rank.
        nodes = servable_nodes(discover_nodes(grid, known, cfg), strategy, warned)
        sampled = sample_nodes(nodes, cfg, sampler)
        logger.info(
            "configure_train: round %s: sampled %s of %s nodes",
            server_round,
            len(sampled),
            len(nodes),
        )
        config = ConfigRecord({"server-round": server_round, **base_config})
        if server.secure_aggregation:
            result = run_secure_round(
                grid, sampled, strategy, config, cfg, server_round, num_available=len(nodes)
            )
        else:
            result = _plain_round(grid, sampled, strategy, config, cfg, server_round, len(nodes))
        received = result.replies
        for client_id, metrics in [*received.trained_metrics.items(), *received.declined]:
            recorder.update_client(client_id, server_round, metrics)
        train_loss = weighted_train_loss(received.trained_metrics, result.accepted)

        # Evaluate on held-out records and save the global adapter.
        arrays = strategy.adapter()
        eval_metrics: dict[str, float] = {}
        due = server.eval_every and (
            server_round % server.eval_every == 0 or server_round == server.num_rounds
        )
        if evaluator is not None and due:
            eval_metrics = evaluator(arrays)
        save_adapter(model, arrays, run_dir / "global_adapter")
        recorder.write_privacy()

        # Record the round, then checkpoint it: a crash in between reruns the round.
        max_epsilon = recorder.max_epsilon()
        row = {
            "round": server_round,
            "num_sampled": result.num_sampled,
            "num_replies": result.num_replies,
            "num_trained": len(received.trained_metrics),
            "num_accepted": len(result.accepted),
            "num_rejected": result.num_rejected,
            "num_declined": len(received.declined),
            "num_failed": len(received.failures),
            "num_replayed": sum(
                int(m.get("replayed", 0)) for m in received.trained_metrics.values()
            ),
            "aggregated": result.applied,
            "train_loss": train_loss,
            "eval_loss": eval_metrics.get("eval-loss"),
            "bleu": eval_metrics.get("bleu"),
            "rouge_l": eval_metrics.get("rouge-l"),
            "max_epsilon": max_epsilon,
            "advertiser_epsilon": recorder.advertiser_epsilon(),
            "advertiser_clipping_norm": _last_clipping_norm(strategy, server_round),
            "bytes_up": received.bytes_up,
            "bytes_down": result.bytes_down,
            "round_time_s": time.perf_counter() - started,
            **result.extra,
        }
        recorder.append_round(row)
        save_checkpoint(
            run_dir,
            Checkpoint(
                server_round=server_round,
                strategy=server.strategy,
                global_state=strategy.state,
                optimizer_state=strategy.optimizer.state_dict(),
                config=cfg.to_dict(),
                rng=capture_rng(sampler),
                clients={cid: dataclasses.asdict(e) for cid, e in recorder.clients.items()},
                advertiser_dp=(
                    strategy.advertiser_dp.state_dict() if strategy.advertiser_dp else {}
                ),
            ),
        )
        logger.info(
            "round %s/%s: sampled %s, trained %s, rejected %s, declined %s, failed %s | "
            "train_loss=%s eval_loss=%s bleu=%s | max_epsilon=%s | bytes up=%s down=%s | %.1fs",
            server_round,
            server.num_rounds,
            row["num_sampled"],
            row["num_trained"],
            row["num_rejected"],
            row["num_declined"],
            row["num_failed"],
            _fmt(train_loss),
            _fmt(row["eval_loss"]),
            _fmt(row["bleu"]),
            _fmt(max_epsilon),
            received.bytes_up,
            result.bytes_down,
            row["round_time_s"],
        )
    return strategy.adapter()


def _last_clipping_norm(strategy: GlobalAdapter, server_round: int) -> float | None:
    """Advertiser-DP clipping norm used in ``server_round``; None without DP or aggregation."""
    if strategy.advertiser_dp is None:
        return None
    releases = strategy.advertiser_dp.releases
    if releases and releases[-1].server_round == server_round:
        return releases[-1].clipping_norm
    return None


def _plain_round(
    grid: Grid,
    sampled: list[Node],
    strategy: GlobalAdapter,
    config: ConfigRecord,
    cfg: RunConfig,
    server_round: int,
    num_available: int,
) -> RoundResult:
    """Train ``sampled`` clients, then validate and aggregate their updates in the clear."""
    server = cfg.server
    messages, bytes_down = train_messages(sampled, strategy, config, server.wire_dtype)
    replies = list(grid.send_and_receive(messages, timeout=server.round_timeout))
    received = sort_replies(replies, sampled, server_round)

    # Validate and aggregate the updates; rejected ones are logged with their reason.
    sampling = RoundSampling(server_round, len(sampled), num_available)
    outcome = strategy.aggregate(
        received.updates, min_updates=server.min_train_nodes, sampling=sampling
    )
    return RoundResult(
        received,
        num_sampled=len(messages),
        num_replies=len(replies),
        accepted=outcome.accepted,
        num_rejected=len(outcome.rejected),
        applied=outcome.applied,
        bytes_down=bytes_down,
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
