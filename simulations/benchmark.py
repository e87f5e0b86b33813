"""Utility and cost benchmarks: centralized vs federated, DP vs non-DP, side by side.

Run ``python -m simulations.benchmark --data-dir DIR --output runs/bench``. It trains, on
the same held-out split and with the same number of training examples seen:

- centralized non-private training on the pooled client records,
- federated training without DP,
- federated training with DP at each ``--epsilons`` value,

scores each on the held-out sources (BLEU, ROUGE-L, slot error rate), and measures in the
same process the DP step time over the non-DP step time and the adapter bytes per client
per round over the base model's bytes. Results go to ``benchmark.json`` and a Markdown table.

``--only aggregation`` times the server's aggregation against the number of clients
instead, with the payload ratios of every wire format and the largest client's local round
(:mod:`simulations.aggregation_cost`). It reads no utility results and trains no adapter to
completion.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from client.train import steps_per_round, train_local
from common.adapter import get_adapter_arrays, payload_bytes, save_adapter
from common.config import RunConfig
from common.inference import evaluate_run
from common.model import base_model_bytes, build_lora_model, load_tokenizer
from common.text import encode_records
from simulations.aggregation_cost import (
    format_aggregation,
    payload_ratios,
    time_aggregation,
    time_client_round,
)
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


def run_federated(cfg: RunConfig, output: Path, *, dp: bool, epsilon: float) -> Path:
    """Run ``fedads simulate`` in a subprocess, so every run starts a fresh Flower runtime."""
    run_cfg = cfg.replace(privacy={"dp": dp, "target_epsilon": epsilon}, output=str(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    config_path = output.parent / f"{output.name}.toml"
    config_path.write_text(run_cfg.to_toml(), encoding="utf-8")
    command = [sys.executable, "-m", "common.cli", "simulate", "--config", str(config_path)]
    subprocess.run(command, check=True)
    return output


def run_centralized(cfg: RunConfig, output: Path, *, num_examples: int) -> Path:
    """Train one adapter without DP on the pooled client records, for ``num_examples``."""
    cfg = prepare_run(cfg.replace(privacy={"dp": False}, output=str(output)))
    data = federated_data(cfg.data, cfg.seed)
    tokenizer = load_tokenizer(cfg.model.name)
    pooled = [record for partition in data.partitions for record in partition]
    examples = encode_records(tokenizer, pooled, max_length=cfg.model.max_length)
    model = build_lora_model(cfg.model, seed=cfg.seed)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="base run config (default: built-in)")
    parser.add_argument("--data-dir", required=True, help="folder holding e2e/devset.csv")
    parser.add_argument("--output", type=Path, default=Path("runs/bench"))
    parser.add_argument("--epsilons", default="8,3", help="comma-separated DP targets")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated subset: central,nodp,dp,cost,aggregation "
        "(default: all but aggregation)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="interleaved repetitions of each aggregation timing, reported as the median "
        "(default: 5; the client round uses at most 3)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)

    cfg = RunConfig.from_toml(args.config) if args.config else RunConfig()
    cfg = cfg.replace(data={"data_dir": str(Path(args.data_dir).resolve())})
    only = set(filter(None, args.only.split(","))) or {"central", "nodp", "dp", "cost"}
    results_path = args.output / "benchmark.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    args.output.mkdir(parents=True, exist_ok=True)

    if "aggregation" in only:
        results["aggregation_s"] = time_aggregation(cfg, repeats=args.repeats)
        results["payload_ratios"] = payload_ratios(cfg)
        results["client_round"] = time_client_round(cfg, repeats=min(args.repeats, 3))
        only.discard("aggregation")
        if not only:
            results_path.write_text(json.dumps(results, indent=2), encoding="utf-8")
            print(format_aggregation(results))
            return 0

    seen = examples_seen(cfg)
    results["examples_seen"] = seen
    runs: dict[str, Path] = {}
    if "central" in only:
        runs["centralized, no DP"] = run_centralized(
            cfg, args.output / "centralized", num_examples=seen
        )
    if "nodp" in only:
        runs["federated, no DP"] = run_federated(cfg, args.output / "fed-nodp", dp=False, epsilon=8)
    if "dp" in only:
        for epsilon in (float(e) for e in args.epsilons.split(",")):
            runs[f"federated, DP ε={epsilon:g}"] = run_federated(
                cfg, args.output / f"fed-dp-eps{epsilon:g}", dp=True, epsilon=epsilon
            )
    for name, run_dir in runs.items():
        scores = evaluate_run(run_dir, run_dir / HELDOUT_FILE)
        results.setdefault("utility", {})[name] = scores
        logger.info(
            "benchmark: %s: BLEU %.2f ROUGE-L %.2f", name, scores["bleu"], scores["rouge_l"]
        )
    if "cost" in only:
        results["step_time"] = time_steps(cfg)
        results["payload"] = payload_ratio(cfg)
    results_path.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(format_table(results))
    if "aggregation_s" in results:
        print(format_aggregation(results))
    return 0


def format_table(results: dict) -> str:
    lines = ["| setup | BLEU | ROUGE-L | slot error rate |", "|---|---|---|---|"]
    for name, scores in results.get("utility", {}).items():
        ser = scores["slot_error_rate"]
        lines.append(
            f"| {name} | {scores['bleu']:.2f} | {scores['rouge_l']:.2f} | "
            f"{'n/a' if ser is None else f'{ser:.3f}'} |"
        )
    if "step_time" in results:
        st = results["step_time"]
        lines.append(
            f"\nDP step / non-DP step: {st['dp_over_non_dp']:.3f} "
            f"({st['dp_step_s']:.3f} s / {st['non_dp_step_s']:.3f} s)"
        )
    if "payload" in results:
        pl = results["payload"]
        lines.append(
            f"Adapter bytes per client per round / base model bytes: {pl['ratio']:.4f} "
            f"({pl['adapter_bytes']} / {pl['base_bytes']})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
