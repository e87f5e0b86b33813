"""The ``fedads`` command: simulate, generate and evaluate."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common.config import ConfigError, RunConfig
from common.data import DataValidationError

logger = logging.getLogger("fedads")

DEFAULT_DATA_DIR = "data"


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a federated DP-LoRA simulation and write a run folder",
        description="Run a Flower simulation in which every advertiser trains a LoRA adapter "
        "with DP-SGD and the server aggregates the adapters with FedAvg.",
    )
    p.add_argument("--config", type=Path, help="TOML run config (flags override its values)")
    p.add_argument(
        "--data-dir",
        help="folder with e2e/devset.csv or the records file; missing E2E files are "
        f"downloaded (default: $FEDADS_DATA_DIR or ./{DEFAULT_DATA_DIR})",
    )
    p.add_argument("--output", help="run folder to create (default: runs/<timestamp>)")
    p.add_argument("--num-rounds", type=int, help="federated rounds")
    p.add_argument("--num-clients", type=int, help="number of simulated advertisers")
    p.add_argument(
        "--max-examples-per-client", type=int, help="cap on each client's training records"
    )
    p.add_argument("--target-epsilon", type=float, help="each client's ε budget for the run")
    p.add_argument("--target-delta", type=float, help="each client's δ")
    p.add_argument("--no-dp", action="store_true", help="train without differential privacy")
    p.add_argument("--model", help="base model: minilm-l6 (default), a local folder or a hub id")
    p.add_argument("--local-epochs", type=float, help="local passes over each client's data")
    p.add_argument("--batch-size", type=int, help="expected DP-SGD batch size")
    p.add_argument("--learning-rate", type=float, help="client AdamW learning rate")
    p.add_argument("--lora-r", type=int, help="LoRA rank")
    p.add_argument("--max-length", type=int, help="longest accepted record, in tokens")
    p.add_argument("--dataset", choices=("e2e", "records"), help="dataset kind")
    p.add_argument("--train-file", help="file name in the data folder (E2E) or records file")
    p.add_argument("--source-column", help="column holding the source (records dataset)")
    p.add_argument("--text-column", help="column holding the ad text (records dataset)")
    p.add_argument("--max-chars", type=int, help="longest accepted record, in characters")
    p.add_argument("--seed", type=int, help="seed for splits, sampling and initialization")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="write ad texts with a run's global adapter")
    p.add_argument("--run", type=Path, required=True, help="run folder written by simulate")
    p.add_argument("--source", required=True, help="product attributes or audience description")
    p.add_argument("-n", type=int, default=1, help="number of texts (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed when -n > 1")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a run's global adapter on a test file")
    p.add_argument("--run", type=Path, required=True, help="run folder written by simulate")
    p.add_argument(
        "--test",
        type=Path,
        help="test file: E2E CSV (mr,ref) or source,text CSV/JSONL (default: RUN/heldout.csv)",
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N distinct sources")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedads",
        description="Privacy-preserving federated fine-tuning of LoRA adapters for ad copy.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log DEBUG messages")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
    _add_generate(sub)
    _add_evaluate(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Build the run config: defaults, then ``--config``, then flags."""
    cfg = RunConfig.from_toml(args.config) if args.config else RunConfig()
    data_dir = args.data_dir or (
        None if args.config else os.environ.get("FEDADS_DATA_DIR", DEFAULT_DATA_DIR)
    )
    flag_map = {
        "model": {"name": args.model, "lora_r": args.lora_r, "max_length": args.max_length},
        "data": {
            "data_dir": data_dir,
            "num_clients": args.num_clients,
            "max_examples_per_client": args.max_examples_per_client,
            "dataset": args.dataset,
            "train_file": args.train_file,
            "source_column": args.source_column,
            "text_column": args.text_column,
            "max_chars": args.max_chars,
        },
        "train": {
            "local_epochs": args.local_epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
        },
        "privacy": {
            "target_epsilon": args.target_epsilon,
            "target_delta": args.target_delta,
            "dp": False if args.no_dp else None,
        },
        "server": {"num_rounds": args.num_rounds},
    }
    changes = {
        section: {key: value for key, value in values.items() if value is not None}
        for section, values in flag_map.items()
    }
    cfg = cfg.replace(**{section: values for section, values in changes.items() if values})
    if args.seed is not None:
        cfg = cfg.replace(seed=args.seed)
    output = args.output or cfg.output or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg.replace(output=output)


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.run import simulate

    cfg = config_from_args(args)
    if not cfg.privacy.dp:
        logger.warning("simulate: --no-dp: clients train without differential privacy")
    run_dir = simulate(cfg)
    print(f"run folder: {run_dir}")
    print(f"report:     {run_dir / 'report.md'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from common.generation import generate_texts
    from common.inference import load_run_model

    if args.n < 1:
        raise ConfigError(f"invalid -n {args.n}: expected an integer >= 1")
    model, tokenizer, cfg = load_run_model(args.run)
    texts = generate_texts(
        model,
        tokenizer,
        [args.source],
        max_new_tokens=cfg.model.max_new_tokens,
        num_return_sequences=args.n,
        do_sample=args.n > 1,
        seed=args.seed,
    )[0]
    for text in texts:
        print(text)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from common.inference import evaluate_run

    test_file = args.test or args.run / "heldout.csv"
    result = evaluate_run(args.run, test_file, limit=args.limit)
    print(f"{'metric':<18}{'value':>10}")
    print(f"{'BLEU':<18}{result['bleu']:>10.2f}")
    print(f"{'ROUGE-L':<18}{result['rouge_l']:>10.2f}")
    ser = result["slot_error_rate"]
    print(f"{'slot error rate':<18}{'n/a' if ser is None else f'{ser:>10.4f}':>10}")
    print(f"{'sources':<18}{result['num_sources']:>10d}")
    print(f"written: {args.run / 'eval.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    commands = {"simulate": cmd_simulate, "generate": cmd_generate, "evaluate": cmd_evaluate}
    try:
        return commands[args.command](args)
    except (ConfigError, DataValidationError, FileNotFoundError, FileExistsError) as err:
        print(f"fedads {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as err:
        print(f"fedads {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
