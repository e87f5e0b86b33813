"""Flower ServerApp: FedAvg over LoRA adapters with per-round checkpoints and evaluation."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.loop import run_rounds

logger = logging.getLogger(__name__)


def build_server_app(cfg: RunConfig | None = None, *, test_records: list | None = None) -> ServerApp:
    """ServerApp using ``cfg``, or the ``run_config`` Flower passes when ``cfg`` is None.

    ``test_records`` are held-out records for server evaluation. Without them, a ServerApp
    reading an E2E run config evaluates on that dataset's held-out split.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or RunConfig.from_dict(context.run_config)
        records = test_records
        if records is None and run_cfg.data.dataset == "e2e":
            from simulations.dataset import federated_data

            records = list(federated_data(run_cfg.data, run_cfg.seed).test)
        run_dir = Path(run_cfg.output or "runs/latest")
        run_rounds(grid, run_cfg, run_dir, evaluator_records=records)

    return app


app = build_server_app()
