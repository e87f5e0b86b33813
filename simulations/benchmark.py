"""Utility and cost benchmarks: setups side by side on the same held-out split.

Run ``python -m simulations.benchmark --data-dir DIR --output runs/bench --only MODES``.
Every federated row runs ``fedads simulate`` on the base config (``--config``, default
``simulations/configs/main.toml``) with the row's overrides, and is scored on the run's
held-out sources (BLEU, ROUGE-L, slot error rate). The modes:

- ``central``: centralized non-private training on the pooled client records, for as many
  training examples as the federated runs see;
- ``nodp`` and ``dp``: federated training without DP, and with record-level DP at each
  ``--epsilons`` value;
- ``strategies``: record-level DP with FedAvg, FedAvgM, FedProx, FedAdam, FFA-LoRA and mixed LoRA
  ranks (``--strategies`` picks a subset);
- ``attack``: a clean run, and runs in which one client scales its update
  (``data.attack-client``) without and with a robust rule (``--attack-defense``);
- ``units``: advertiser-level DP against record-level DP at the same ε;
- ``exposure``: ``fedads audit`` per ε, the canary exposure of a DP run and its control;
- ``cost``: the DP step time over the non-DP step time and the adapter bytes per client
  per round over the base model's bytes, measured in this process.

``--num-rounds``, ``--num-clients``, ``--max-examples-per-client`` and ``--eval-limit``
shrink every row for a quick run; ``benchmark.json`` records them, and a results file of
another setup is never extended. Results go to ``benchmark.json`` after every row and to a
Markdown table whose last column is each row's config diff against the base config.

``--only aggregation`` times the server's aggregation against the number of clients
instead, with the payload ratios of every wire format and the largest client's local round
(:mod:`simulations.aggregation_cost`). It reads no utility results and trains no adapter to
completion.

Rows share one public warm start (``[warm-start]``), trained once and kept in
``$FEDADS_CACHE_DIR`` (default: ``OUTPUT/cache``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from client.train import steps_per_round, train_local
from common.adapter import get_adapter_arrays, payload_bytes, save_adapter
from common.cli import MAIN_CONFIG
from common.config import ConfigError, RunConfig
from common.inference import evaluate_run
from common.model import base_model_bytes, build_lora_model, load_tokenizer
from common.text import encode_records
from server.warm_start import warm_start_adapter
from simulations.aggregation_cost import (
    format_aggregation,
    payload_ratios,
    time_aggregation,
    time_client_round,
)
from simulations.benchmark_rows import (
    DEFENSES,
    MODES,
    STRATEGY_KEYS,
    apply_overrides,
    build_rows,
    describe_base,
    scale_overrides,
)
from simulations.benchmark_runs import audit_entries, run_row
from simulations.benchmark_table import attack_summary, format_table
from simulations.dataset import federated_data
from simulations.run import HELDOUT_FILE, prepare_run, write_heldout

logger = logging.getLogger(__name__)


def examples_seen(cfg: RunConfig) -> int:
    """Expected training examples seen by all clients over all rounds.

    Each client is sampled in a ``fraction_train`` share of the rounds on average.
    """
    data = federated_data(cfg.data, cfg.seed)
    total = 0
    for partition in data.partitions:
        n = len(partition)
        steps = steps_per_round(n, cfg.train.batch_size, cfg.train.local_epochs)
        total += steps * min(cfg.train.batch_size, n)
    return round(total * cfg.server.num_rounds * cfg.server.fraction_train)


def run_centralized(cfg: RunConfig, output: Path, *, num_examples: int) -> Path:
    """Train one adapter without DP on the pooled client records, for ``num_examples``.

    Training starts from the run's public warm start (``[warm-start]``), as federated runs do.
    """
    cfg = prepare_run(cfg.replace(privacy={"dp": False}, output=str(output)))
    data = federated_data(cfg.data, cfg.seed)
    tokenizer = load_tokenizer(cfg.model.name)
    pooled = [record for partition in data.partitions for record in partition]
    examples = encode_records(tokenizer, pooled, max_length=cfg.model.max_length)
    model = build_lora_model(cfg.model, seed=cfg.seed)
    # The same public warm start as the federated rows, so every row starts alike.
    warm_start_adapter(cfg, model, output)
    steps = max(1, round(num_examples / cfg.train.batch_size))
    started = time.perf_counter()
    result = train_local(
        model,
        examples,
        train=cfg.train,
        privacy=cfg.privacy,
        noise_multiplier=0.0,
        pad_token_id=int(tokenizer.pad_token_id or 0),
        seed=cfg.seed,
        steps=steps,
    )
    logger.info(
        "centralized: %s steps of %s in %.0fs, loss %.3f",
        result.steps,
        cfg.train.batch_size,
        time.perf_counter() - started,
        result.train_loss,
    )
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    write_heldout(list(data.test), output / HELDOUT_FILE)
    save_adapter(model, get_adapter_arrays(model), output / "global_adapter")
    return output


def time_steps(cfg: RunConfig, *, repeats: int = 3, steps: int = 8) -> dict[str, float]:
    """Median seconds per step with and without DP, interleaved on the largest client."""
    data = federated_data(cfg.data, cfg.seed)
    tokenizer = load_tokenizer(cfg.model.name)
    largest = max(data.partitions, key=len)
    examples = encode_records(tokenizer, largest, max_length=cfg.model.max_length)
    model = build_lora_model(cfg.model, seed=cfg.seed)
    timings: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(repeats):
        for dp in (False, True):
            started = time.perf_counter()
            train_local(
                model,
                examples,
                train=cfg.train,
                privacy=cfg.privacy.__class__(dp=dp, target_epsilon=8.0),
                noise_multiplier=1.0,
                pad_token_id=int(tokenizer.pad_token_id or 0),
                seed=repeat,
                steps=steps,
            )
            timings[dp].append((time.perf_counter() - started) / steps)
    non_dp = statistics.median(timings[False])
    with_dp = statistics.median(timings[True])
    return {"non_dp_step_s": non_dp, "dp_step_s": with_dp, "dp_over_non_dp": with_dp / non_dp}


def payload_ratio(cfg: RunConfig) -> dict[str, float]:
    """Adapter bytes sent per client per round over the base model's bytes."""
    model = build_lora_model(cfg.model, seed=cfg.seed)
    adapter = payload_bytes(get_adapter_arrays(model))
    base = base_model_bytes(model.get_base_model())
    return {"adapter_bytes": adapter, "base_bytes": base, "ratio": adapter / base}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        type=Path,
        default=MAIN_CONFIG,
        help="base run config of every row (default: simulations/configs/main.toml)",
    )
    parser.add_argument("--data-dir", required=True, help="folder holding e2e/devset.csv")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("runs/bench"),
        help="results folder: benchmark.json, the table and one run folder per row; a "
        "folder holding results of another scale is rejected (default: runs/bench)",
    )
    parser.add_argument(
        "--epsilons",
        help="comma-separated record-level DP targets ε (default: 8,3 for dp and exposure, "
        "8 for strategies, attack and units)",
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated subset of {','.join(MODES)} (default: central,nodp,dp,cost)",
    )
    parser.add_argument(
        "--skip-client-round",
        action="store_true",
        help="with --only aggregation, skip timing the largest client's local DP round "
        "(minutes on a CPU), and so the aggregation share of a round",
    )
    parser.add_argument(
        "--central-learning-rate",
        type=float,
        help="AdamW learning rate of --only central (default: the config's train.learning-rate); "
        "one sequential learner takes far more steps than a client does in a round",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="interleaved repetitions of each aggregation timing, reported as the median "
        "(default: 5; the client round uses at most 3)",
    )
    parser.add_argument(
        "--strategies",
        default="",
        help=f"comma-separated rows of --only strategies, a subset of {','.join(STRATEGY_KEYS)} "
        "(default: all). ffa-lora and mixed-ranks flip model.ffa-lora and "
        "model.client-ranks relative to the base config",
    )
    attack = parser.add_argument_group("attack mode")
    attack.add_argument(
        "--attack-client",
        type=int,
        default=0,
        help="partition id of the hostile client (default: 0)",
    )
    attack.add_argument(
        "--attack-scale",
        type=float,
        default=100.0,
        help="factor the hostile client multiplies its update by (default: 100)",
    )
    attack.add_argument(
        "--attack-defense",
        choices=DEFENSES,
        default="median",
        help="server rule of the protected row: server.robust = median or trimmed-mean, or "
        "server.norm-bound = --attack-norm-bound (default: median)",
    )
    attack.add_argument(
        "--attack-norm-bound",
        type=float,
        default=0.0,
        help="L2 norm each update is scaled down to with --attack-defense norm-bound",
    )
    parser.add_argument(
        "--audit-candidates",
        type=int,
        default=0,
        help="random codes each canary is ranked against in --only exposure; the exposure is "
        "at most log2 of this (default: 0, every other code of the format)",
    )
    scale = parser.add_argument_group(
        "scale", "reduced setups, applied to every row and recorded in benchmark.json"
    )
    scale.add_argument("--num-rounds", type=int, help="server.num-rounds of every run")
    scale.add_argument("--num-clients", type=int, help="data.num-clients of every run")
    scale.add_argument(
        "--max-examples-per-client", type=int, help="data.max-examples-per-client of every run"
    )
    scale.add_argument(
        "--eval-limit",
        type=int,
        default=0,
        help="held-out sources scored per run (default: 0, all of them)",
    )
    return parser


def _check_setup(results: dict[str, Any], setup: dict[str, Any], path: Path) -> None:
    """Raise ConfigError when ``path`` contains results of another base config or scale."""
    stored = results.get("setup")
    if stored is None and results.get("utility"):
        # Files without a setup record come from full-scale runs of the built-in modes.
        stored = {**setup, "scale": {}, "eval_limit": 0}
    if stored is not None and stored != setup:
        raise ConfigError(
            f"{path} contains results of another setup ({stored}), not {setup}: pass the "
            "same --config and scale flags, or a new --output folder"
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    only = set(filter(None, args.only.split(","))) or {"central", "nodp", "dp", "cost"}
    if only - set(MODES):
        parser.error(f"invalid --only {args.only!r}: expected a subset of {','.join(MODES)}")
    if args.eval_limit < 0:
        parser.error(f"invalid --eval-limit {args.eval_limit}: expected >= 0 (0: all sources)")

    try:
        base = RunConfig.from_toml(args.config)
        scale = scale_overrides(
            num_rounds=args.num_rounds,
            num_clients=args.num_clients,
            max_examples_per_client=args.max_examples_per_client,
        )
        cfg = apply_overrides(base, {**scale, "data.data-dir": str(Path(args.data_dir).resolve())})
        rows = build_rows(
            only,
            cfg,
            epsilons=args.epsilons,
            strategies=args.strategies,
            attack_client=args.attack_client,
            attack_scale=args.attack_scale,
            attack_defense=args.attack_defense,
            attack_norm_bound=args.attack_norm_bound,
        )
    except ConfigError as err:
        parser.error(str(err))
    # Every row starts from the same public warm start; train it once for all of them.
    os.environ.setdefault("FEDADS_CACHE_DIR", str((args.output / "cache").resolve()))
    setup = {
        "config": str(args.config.resolve()),
        "scale": scale,
        "eval_limit": args.eval_limit,
    }
    if scale or args.eval_limit:
        logger.warning(
            "benchmark: reduced setup %s, eval limit %s: results do not stand for the full config",
            scale,
            args.eval_limit or "none",
        )
    results_path = args.output / "benchmark.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    try:
        _check_setup(results, setup, results_path)
    except ConfigError as err:
        parser.error(str(err))
    results["setup"] = setup
    results["base"] = describe_base(cfg)
    args.output.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2, ensure_ascii=False), "utf-8")

    if "aggregation" in only:
        results["aggregation_s"] = time_aggregation(cfg, repeats=args.repeats)
        results["payload_ratios"] = payload_ratios(cfg)
        if args.skip_client_round:
            logger.info("benchmark: --skip-client-round: no aggregation share of a round")
        else:
            results["client_round"] = time_client_round(cfg, repeats=min(args.repeats, 3))
        only.discard("aggregation")
        if not only:
            save()
            print(format_aggregation(results))
            return 0

    if "central" in only:
        seen = examples_seen(cfg)
        results["examples_seen"] = seen
        central_cfg, diff = cfg, {"privacy.dp": False}
        if args.central_learning_rate is not None:
            central_cfg = cfg.replace(train={"learning_rate": args.central_learning_rate})
            diff["train.learning-rate"] = args.central_learning_rate
        run_dir = run_centralized(central_cfg, args.output / "centralized", num_examples=seen)
        scores = evaluate_run(run_dir, run_dir / HELDOUT_FILE, limit=args.eval_limit or None)
        results.setdefault("utility", {})["centralized, no DP"] = {
            **scores,
            "mode": "central",
            "config_diff": diff,
            "run_dir": str(run_dir),
        }
        save()
    for row in rows:
        if row.mode == "exposure":
            results.setdefault("exposure", {}).update(
                audit_entries(row, cfg, args.output, candidates=args.audit_candidates)
            )
        else:
            results.setdefault("utility", {})[row.name] = run_row(
                row, cfg, args.output, eval_limit=args.eval_limit
            )
        if row.mode == "attack":
            results["attack"] = attack_summary(results["utility"])
        save()
    if "cost" in only:
        results["step_time"] = time_steps(cfg)
        results["payload"] = payload_ratio(cfg)
    save()
    print(format_table(results))
    if "aggregation_s" in results:
        print(format_aggregation(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
