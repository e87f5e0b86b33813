"""Simulation runner: one Flower simulation from a RunConfig to a complete run folder."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from client.app import build_client_app
from common.config import ConfigError, RunConfig
from common.data import AdRecord
from common.model import load_tokenizer
from common.text import encode_records
from server.app import build_server_app
from server.checkpoint import drop_rounds_after, load_checkpoint
from server.warm_start import load_public_records, public_data_path
from simulations.dataset import FederatedData, federated_data
from simulations.report import load_metrics, write_report

logger = logging.getLogger(__name__)

HELDOUT_FILE = "heldout.csv"


def write_heldout(records: list[AdRecord], path: Path) -> Path:
    """Write the held-out records as a ``source,text`` CSV for ``fedads evaluate``."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "text"])
        for record in records:
            writer.writerow([record.source, record.text])
    return path


def prepare_run(cfg: RunConfig) -> RunConfig:
    """Resolve paths to absolute ones and point the client ledgers into the run folder.

    Flower's simulation runs clients in worker processes, which must find the data and
    ledgers whatever their working directory.
    """
    run_dir = Path(cfg.output).resolve()
    ledger_dir = cfg.privacy.ledger_dir or str(run_dir / "ledgers")
    return cfg.replace(
        data={"data_dir": str(Path(cfg.data.data_dir).resolve())},
        privacy={"ledger_dir": str(Path(ledger_dir).resolve())},
        output=str(run_dir),
    )


def check_token_lengths(cfg: RunConfig, data: FederatedData) -> None:
    """Fail before any worker starts if a record is longer than ``model.max-length`` tokens."""
    tokenizer = load_tokenizer(cfg.model.name)
    for partition in data.partitions:
        encode_records(tokenizer, partition, max_length=cfg.model.max_length)
    encode_records(tokenizer, data.test, max_length=cfg.model.max_length)


def check_warm_start_disjoint(cfg: RunConfig, data: FederatedData) -> None:
    """Fail if the public warm-start file contains a record of an advertiser's partition.

    The warm start trains without DP, so an advertiser record in its file would be trained
    on with no protection at all. Records are compared as loaded, by (source, text).
    """
    if not cfg.warm_start.enabled:
        return
    path = public_data_path(cfg)
    public = {(r.source, r.text) for r in load_public_records(cfg, path)}
    shared = sum(
        1 for partition in data.partitions for r in partition if (r.source, r.text) in public
    )
    if shared:
        raise ConfigError(
            f"warm-start.file = {cfg.warm_start.file!r}: {shared} of the advertisers' records "
            f"are also in {path}, and the warm start trains on them without DP. Use a public "
            'file disjoint from the advertisers\' data, or warm-start.file = "" to skip it'
        )


def simulate(
    cfg: RunConfig,
    *,
    backend_config: dict | None = None,
    resume: bool = False,
    client_app: ClientApp | None = None,
) -> Path:
    """Run the federated simulation and write the run folder; return its path.

    The folder contains ``config.toml``, ``metrics.jsonl``, ``privacy.json``,
    ``global_adapter/``, ``checkpoint/``, ``heldout.csv``, ``report.md`` with its plots,
    and ``ledgers/`` (the clients' privacy ledgers, which in a deployment stay on each
    client's machine).

    With ``resume``, ``cfg`` must be the run's own config (``RUN_DIR/config.toml``): the
    server continues after the last checkpointed round, and clients whose round was cut
    short re-send the update their ledger already counts (``client.release``).
    ``client_app`` replaces the fedads ClientApp, e.g. to simulate failing clients.
    """
    cfg = prepare_run(cfg)
    run_dir = Path(cfg.output)
    if resume:
        checkpoint = load_checkpoint(run_dir)
        if checkpoint is None and not (run_dir / "config.toml").is_file():
            raise FileNotFoundError(
                f"run folder {run_dir} has no checkpoint and no config.toml to resume from: "
                "start a new run with --output instead"
            )
        if checkpoint is None:
            # Killed before round 1 was checkpointed: nothing to continue, so start over.
            # Clients that trained in the lost round re-send their counted update.
            dropped = drop_rounds_after(run_dir / "metrics.jsonl", 0)
            logger.warning(
                "simulate: %s has no checkpoint (it stopped before round 1 was saved): "
                "running it from round 1, dropping %s metrics lines",
                run_dir,
                dropped,
            )
        else:
            logger.info(
                "simulate: resuming %s after round %s of %s",
                run_dir,
                checkpoint.server_round,
                cfg.server.num_rounds,
            )
    elif (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoint").exists():
        raise FileExistsError(
            f"run folder {run_dir} already contains a run: pass a new --output folder, or "
            f"--resume {run_dir} to continue it"
        )
    data = federated_data(cfg.data, cfg.seed)
    check_token_lengths(cfg, data)
    check_warm_start_disjoint(cfg, data)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (run_dir / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    write_heldout(list(data.test), run_dir / HELDOUT_FILE)
    logger.info(
        "simulate: %s clients (%s to %s records), %s held-out records, %s rounds -> %s",
        data.num_clients,
        min(data.partitions.sizes),
        max(data.partitions.sizes),
        len(data.test),
        cfg.server.num_rounds,
        run_dir,
    )

    num_cpus = os.cpu_count() or 1
    backend = backend_config or {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": num_cpus, "include_dashboard": False},
    }
    run_simulation(
        server_app=build_server_app(cfg, test_records=list(data.test)),
        client_app=client_app or build_client_app(cfg),
        num_supernodes=data.num_clients,
        backend_config=backend,
    )

    rounds = load_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    if len(rounds) < cfg.server.num_rounds:
        raise RuntimeError(
            f"simulation stopped after {len(rounds)} of {cfg.server.num_rounds} rounds: "
            "see the errors logged above"
        )
    report = write_report(run_dir)
    logger.info("simulate: report written to %s", report)
    return run_dir
