"""The ``fedads`` command: simulate, generate and evaluate."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common.config import ConfigError, RunConfig, load_toml
from common.data import DataValidationError

logger = logging.getLogger("fedads")

DEFAULT_DATA_DIR = "data"
# The main job, used by `fedads simulate` when no --config is given.
MAIN_CONFIG = Path(__file__).resolve().parent.parent / "simulations" / "configs" / "main.toml"


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """Add ``--config`` and ``--data-dir``, shared by every command that starts runs."""
    p.add_argument(
        "--config",
        type=Path,
        help="TOML run config; flags override its values (default: the main job, "
        "simulations/configs/main.toml)",
    )
    p.add_argument(
        "--data-dir",
        help="folder with e2e/devset.csv (downloaded when missing), the public warm-start "
        "file and records files (default: the config's data.data-dir if it sets one, else "
        f"$FEDADS_DATA_DIR, else ./{DEFAULT_DATA_DIR})",
    )


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a federated DP-LoRA simulation and write a run folder",
        description="Run a Flower simulation in which every advertiser trains a LoRA adapter "
        "with DP-SGD and the server aggregates the adapters with FedAvg.",
    )
    _add_config_flags(p)
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
    p.add_argument(
        "--partitioner",
        choices=("column", "iid", "dirichlet"),
        help="how records are split among clients (default: the config's; column in the main job)",
    )
    p.add_argument(
        "--partition-column",
        help="with --partitioner column, the column (records) or MR attribute (E2E) whose "
        "values name the clients (main job: name)",
    )
    p.add_argument("--max-chars", type=int, help="longest accepted record, in characters")
    p.add_argument("--seed", type=int, help="seed for splits, sampling and initialization")
    p.add_argument(
        "--warm-start-file",
        help="public records to fine-tune the initial adapter on without DP, in the data "
        "folder unless absolute (default: the config's warm-start.file)",
    )
    p.add_argument(
        "--no-warm-start",
        action="store_true",
        help="start round 1 from the base model's fresh adapter, without the public warm start",
    )
    _add_privacy_flags(p)
    _add_federation_flags(p)


def _add_federation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue RUN_DIR after its last checkpointed round, with its config.toml "
        "(no other config flags allowed)",
    )
    p.add_argument(
        "--strategy",
        choices=("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad"),
        help="server strategy (default: fedavg)",
    )
    p.add_argument(
        "--weighting",
        choices=("examples", "uniform"),
        help="weigh client updates by example count (default) or equally",
    )
    p.add_argument("--proximal-mu", type=float, help="FedProx proximal term weight mu")
    p.add_argument(
        "--server-learning-rate",
        type=float,
        help="server learning rate of FedAvgM and FedAdam/FedYogi/FedAdagrad (default: 0.01 "
        "for all; FedAvgM usually takes about 1.0, so pass it with --strategy fedavgm)",
    )
    p.add_argument("--server-momentum", type=float, help="FedAvgM server momentum (default: 0.9)")
    p.add_argument(
        "--robust",
        choices=("none", "median", "trimmed-mean"),
        help="aggregation rule: weighted mean (none, default), coordinate-wise median or "
        "trimmed mean",
    )
    p.add_argument(
        "--norm-bound", type=float, help="scale each client update down to this L2 norm (0: off)"
    )
    p.add_argument(
        "--max-update-norm", type=float, help="reject client updates above this L2 norm (0: off)"
    )
    p.add_argument(
        "--round-timeout", type=float, help="seconds a round waits for replies (default: 3600)"
    )
    p.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="aggregate with SecAgg+ so the server sees only the sum of the updates; unless "
        "[advertiser-dp] is enabled it needs --norm-bound or --max-update-norm, which each "
        "client then clips its update to",
    )
    p.add_argument(
        "--wire-dtype",
        choices=("float32", "float16", "bfloat16"),
        help="dtype of adapter tensors on the wire (default: float32)",
    )
    p.add_argument(
        "--ffa-lora",
        action="store_true",
        help="FFA-LoRA: freeze lora_A at a shared seeded initialization, train and send lora_B",
    )
    p.add_argument(
        "--client-ranks",
        help='LoRA ranks assigned round-robin to clients, e.g. "4,8,16" (FlexLoRA aggregation)',
    )


def _add_privacy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--accountant",
        choices=("prv", "rdp"),
        help="privacy accountant (default: prv; prv is replaced by rdp above target ε 10)",
    )
    p.add_argument(
        "--production",
        action="store_true",
        help="mark the run as production: DP noise and Poisson sampling come from the "
        "operating system's cryptographically secure generator (os.urandom), with noise "
        "hardened against floating-point attacks; such runs cannot be reproduced",
    )
    p.add_argument(
        "--no-scrub-pii",
        action="store_true",
        help="train on records as they are, without replacing emails, phones, cards and URLs",
    )


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="write ad texts with a run's global adapter")
    p.add_argument("--run", type=Path, required=True, help="run folder written by simulate")
    p.add_argument("--source", required=True, help="product attributes or audience description")
    p.add_argument(
        "-n",
        type=int,
        default=1,
        help="number of texts (default: 1): greedy for 1, the n best beams of beam search for "
        "more, unless --sample",
    )
    p.add_argument(
        "--sample",
        action="store_true",
        help="draw the texts with temperature and top-p sampling instead of beam search; small "
        "models such as the MiniLM default write less coherent text this way",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="with --sample (default: 0.8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed with --sample")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a run's global adapter on a test file")
    p.add_argument("--run", type=Path, required=True, help="run folder written by simulate")
    p.add_argument(
        "--test",
        type=Path,
        help="test file: E2E CSV (mr,ref) or source,text CSV/JSONL (default: RUN/heldout.csv)",
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N distinct sources")


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="measure how much a run memorises a planted secret, with and without DP",
        description="Plant a random secret (a canary) several times in one advertiser's "
        "records, train the configured DP run and a non-DP control, and rank the secret "
        "among the other codes of its format under each global adapter (exposure, Carlini "
        "et al. 2019). Writes audit.json, audit.md and both run folders. Without --config "
        "it audits the main job's config, where each advertiser trains only in the rounds "
        "it is sampled for; simulations/configs/audit.toml has every advertiser train in "
        "every round.",
    )
    _add_config_flags(p)
    p.add_argument("--output", help="audit folder to create (default: audits/<timestamp>)")
    p.add_argument("--num-rounds", type=int, help="federated rounds of each run")
    p.add_argument("--num-clients", type=int, help="number of simulated advertisers")
    p.add_argument("--max-examples-per-client", type=int, help="cap on each client's own records")
    p.add_argument("--target-epsilon", type=float, help="each client's ε budget in the DP run")
    p.add_argument("--local-epochs", type=float, help="local passes over each client's data")
    p.add_argument("--learning-rate", type=float, help="client AdamW learning rate")
    p.add_argument("--seed", type=int, help="seed for the data split, the secret and training")
    p.add_argument(
        "--no-warm-start",
        action="store_true",
        help="start both runs from the base model's fresh adapter, without the public warm start",
    )
    _add_privacy_flags(p)
    p.add_argument(
        "--canary-format",
        default="my voucher code is {code}",
        help="text of the secret, with {code} where the random digits go "
        "(default: 'my voucher code is {code}')",
    )
    p.add_argument(
        "--code-digits",
        type=int,
        default=6,
        help="random digits, 1 to 12 (default: 6); above 7 digits pass --candidates, "
        "because every code of the format would take hours to score",
    )
    p.add_argument(
        "--repeats", type=int, default=20, help="copies of the secret planted (default: 20)"
    )
    p.add_argument(
        "--candidates",
        type=int,
        default=0,
        help="random codes the secret is ranked against; the exposure is at most "
        "log2(candidates) bits (default: 0, every other code: 999,999 for 6 digits, "
        "at most 19.93 bits)",
    )
    p.add_argument(
        "--canary-client",
        type=int,
        default=0,
        help="partition index of the advertiser holding the secret (default: 0)",
    )
    p.add_argument(
        "--score-batch-size",
        type=int,
        default=256,
        help="nodes of the candidates' token tree per forward pass (default: 256)",
    )


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
    _add_audit(sub)
    return parser


def _resume_config(args: argparse.Namespace) -> RunConfig:
    """Config of the run folder named by ``--resume``; other config flags are errors."""
    given = sorted(
        f"--{name.replace('_', '-')}"
        for name, value in vars(args).items()
        if name not in ("command", "verbose", "resume") and value not in (None, False)
    )
    if given:
        raise ConfigError(
            f"--resume continues {args.resume} with its own config.toml, so {', '.join(given)} "
            "cannot change it: drop those flags, or start a new run with --output"
        )
    cfg = RunConfig.from_toml(args.resume / "config.toml")
    return cfg.replace(output=str(args.resume))


def _sets_data_dir(values: dict) -> bool:
    """Return whether the tables of a TOML run config set ``data.data-dir``."""
    data = values.get("data")
    return isinstance(data, dict) and ("data-dir" in data or "data_dir" in data)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Build the run config: defaults, then ``--config``, then flags (or ``--resume``)."""
    if getattr(args, "resume", None) is not None:
        return _resume_config(args)
    values = load_toml(args.config or MAIN_CONFIG)
    cfg = RunConfig.from_dict(values)
    data_dir = args.data_dir
    if data_dir is None and not _sets_data_dir(values):
        data_dir = os.environ.get("FEDADS_DATA_DIR", DEFAULT_DATA_DIR)
    flag_map = {
        "model": {
            "name": args.model,
            "lora_r": args.lora_r,
            "max_length": args.max_length,
            "ffa_lora": True if args.ffa_lora else None,
            "client_ranks": args.client_ranks,
        },
        "data": {
            "data_dir": data_dir,
            "num_clients": args.num_clients,
            "max_examples_per_client": args.max_examples_per_client,
            "dataset": args.dataset,
            "train_file": args.train_file,
            "source_column": args.source_column,
            "text_column": args.text_column,
            "max_chars": args.max_chars,
            "partitioner": args.partitioner,
            "partition_column": args.partition_column,
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
            "accountant": args.accountant,
            "production": True if args.production else None,
            "scrub_pii": False if args.no_scrub_pii else None,
        },
        "warm_start": {
            "file": "" if args.no_warm_start else args.warm_start_file,
        },
        "server": {
            "num_rounds": args.num_rounds,
            "strategy": args.strategy,
            "weighting": args.weighting,
            "proximal_mu": args.proximal_mu,
            "server_learning_rate": args.server_learning_rate,
            "server_momentum": args.server_momentum,
            "robust": args.robust,
            "norm_bound": args.norm_bound,
            "max_update_norm": args.max_update_norm,
            "round_timeout": args.round_timeout,
            "wire_dtype": args.wire_dtype,
            "secure_aggregation": True if args.secure_aggregation else None,
        },
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
    from client.runtime import check_secure_mode
    from simulations.run import simulate

    cfg = config_from_args(args)
    check_secure_mode(cfg.privacy)
    if not cfg.privacy.dp:
        logger.warning("simulate: privacy.dp is off: clients train without differential privacy")
    run_dir = simulate(cfg, resume=args.resume is not None)
    print(f"run folder: {run_dir}")
    print(f"report:     {run_dir / 'report.md'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from common.generation import generate_texts
    from common.inference import load_run_model

    if args.n < 1:
        raise ConfigError(f"invalid -n {args.n}: expected an integer >= 1")
    if args.sample and not args.temperature > 0:
        raise ConfigError(f"invalid --temperature {args.temperature}: expected a number > 0")
    model, tokenizer, cfg = load_run_model(args.run)
    texts = generate_texts(
        model,
        tokenizer,
        [args.source],
        max_new_tokens=cfg.model.max_new_tokens,
        num_return_sequences=args.n,
        do_sample=args.sample,
        temperature=args.temperature,
        seed=args.seed,
    )[0]
    for text in texts:
        print(text)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from common.inference import evaluate_run

    test_file = args.test or args.run / "heldout.csv"
    result = evaluate_run(args.run, test_file, limit=args.limit)
    if (args.run / "metrics.jsonl").is_file():
        from simulations.report import write_report

        write_report(args.run)
    print(f"{'metric':<18}{'value':>10}")
    print(f"{'BLEU':<18}{result['bleu']:>10.2f}")
    print(f"{'ROUGE-L':<18}{result['rouge_l']:>10.2f}")
    ser = result["slot_error_rate"]
    print(f"{'slot error rate':<18}{'n/a' if ser is None else f'{ser:>10.4f}':>10}")
    print(f"{'sources':<18}{result['num_sources']:>10d}")
    print(f"written: {args.run / 'eval.json'}")
    return 0


def _simulate_defaults() -> dict[str, object]:
    """Default value of every ``simulate`` flag, for commands that offer only some of them."""
    parser = argparse.ArgumentParser()
    _add_simulate(parser.add_subparsers(dest="command"))
    return vars(parser.parse_args(["simulate"]))


def cmd_audit(args: argparse.Namespace) -> int:
    from client.runtime import check_secure_mode
    from simulations.audit import AuditSettings, CanaryFormat, run_audit

    settings = AuditSettings(
        canary=CanaryFormat(template=args.canary_format, digits=args.code_digits),
        repeats=args.repeats,
        candidates=args.candidates,
        canary_client=args.canary_client,
        batch_size=args.score_batch_size,
    )
    out_dir = Path(args.output or f"audits/{time.strftime('%Y%m%d-%H%M%S')}")
    run_args = argparse.Namespace(**{**_simulate_defaults(), **vars(args), "output": None})
    cfg = config_from_args(run_args)
    check_secure_mode(cfg.privacy)
    audit = run_audit(cfg, out_dir, settings)
    print(f"{'run':<10}{'epsilon':>10}{'rank':>10}{'exposure':>12}{'extrapolated':>14}")
    for name, run in audit["runs"].items():
        epsilon = "off" if run["epsilon"] is None else f"{run['epsilon']:.2f}"
        print(
            f"{name:<10}{epsilon:>10}{run['rank']:>10}{run['exposure']:>12.2f}"
            f"{run['extrapolated_exposure']:>14.2f}"
        )
    print(f"max exposure with {audit['candidates']} candidates: {audit['max_exposure']:.2f}")
    print(f"written: {out_dir / 'audit.json'} and {out_dir / 'audit.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    commands = {
        "simulate": cmd_simulate,
        "generate": cmd_generate,
        "evaluate": cmd_evaluate,
        "audit": cmd_audit,
    }
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
