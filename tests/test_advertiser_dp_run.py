"""Advertiser-level DP in the round loop: resume, privacy.json, report, and a real simulation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from local_grid import LocalGrid, ServerStopped, synthetic_client_app

from common.config import RunConfig
from server.checkpoint import load_checkpoint
from server.loop import run_rounds
from simulations.report import write_report

REPO_ROOT = Path(__file__).resolve().parent.parent


def loop_config(run_dir: Path) -> RunConfig:
    # Synthetic clients send updates of L2 norm about 4, far above the initial norm 0.5,
    # so the adaptive norm grows every round.
    return RunConfig.from_dict(
        {
            "seed": 0,
            "output": str(run_dir),
            "data": {"num-clients": 5},
            "privacy": {"dp": False},
            "server": {
                "num-rounds": 3,
                "eval-every": 0,
                "strategy": "fedadam",
                "fraction-train": 0.6,
                "weighting": "uniform",
            },
            "advertiser-dp": {
                "enabled": True,
                "noise-multiplier": 0.5,
                "clipping-norm": 0.5,
                "adaptive-clipping": True,
                "clipped-count-stddev": 1.0,
            },
        }
    )


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("advertiser") / "straight"
    cfg = loop_config(run_dir)
    adapter = run_rounds(LocalGrid(synthetic_client_app(cfg), 5), cfg, run_dir)
    return run_dir, adapter


def test_resume_keeps_clipping_norm_and_accountant(tmp_path, straight_run):
    straight_dir, expected = straight_run
    stopped_dir = tmp_path / "stopped"
    cfg = loop_config(stopped_dir)
    with pytest.raises(ServerStopped):
        run_rounds(LocalGrid(synthetic_client_app(cfg), 5, stop_after_round=2), cfg, stopped_dir)
    saved = load_checkpoint(stopped_dir).advertiser_dp
    assert saved["history"] == [[0.5, 0.6, 1]]
    assert len(saved["releases"]) == 1
    assert saved["clipping_norm"] > 0.5

    resumed = run_rounds(
        LocalGrid(synthetic_client_app(cfg), 5, node_id_offset=4242), cfg, stopped_dir
    )
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name])
    final = load_checkpoint(stopped_dir).advertiser_dp
    reference = load_checkpoint(straight_dir).advertiser_dp
    assert final["history"] == reference["history"] == [[0.5, 0.6, 3]]
    assert final["clipping_norm"] == reference["clipping_norm"]
    assert final["releases"] == reference["releases"]


def test_privacy_json_gives_advertiser_guarantee(straight_run):
    run_dir, _ = straight_run
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["unit"] == "advertiser"
    assert privacy["units"] == ["advertiser"]
    advertiser = privacy["advertiser"]
    assert advertiser["accountant"] == "rdp"
    assert advertiser["noise_multiplier"] == 0.5
    assert advertiser["update_noise_multiplier"] == pytest.approx((0.5**-2 - 2.0**-2) ** -0.5)
    assert advertiser["planned_sample_rate"] == pytest.approx(0.6)
    assert advertiser["rounds_accounted"] == advertiser["num_rounds"] == 3
    assert advertiser["weighting"].startswith("uniform")
    assert advertiser["epsilon"] > 0

    norms = [entry["clipping_norm"] for entry in advertiser["rounds"]]
    assert norms[0] == 0.5
    assert norms[0] < norms[1] < norms[2] < advertiser["next_clipping_norm"]
    assert all(entry["num_sampled"] == 3 for entry in advertiser["rounds"])
    # Only aggregate values: no client id appears in the advertiser block.
    assert "client-" not in json.dumps(advertiser)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epsilons = [row["advertiser_epsilon"] for row in rows]
    assert epsilons == sorted(epsilons)
    assert epsilons[-1] == pytest.approx(advertiser["epsilon"])
    assert [row["advertiser_clipping_norm"] for row in rows] == norms


def test_report_shows_advertiser_section(straight_run):
    run_dir, _ = straight_run
    text = write_report(run_dir).read_text()
    assert "### Advertiser-level DP" in text
    assert "- unit: `advertiser`" in text
    assert "**Record-level DP was OFF for this run.**" in text
    assert "| round | clipping norm |" in text
    assert "ε / target ε (advertiser level)" in text
    assert "before clipping and noise" in text  # the not-protected list names the server's view


SIMULATION_CONFIG = """\
seed = 0
[model]
max-new-tokens = 8
[data]
eval-sample = 2
[train]
batch-size = 8
local-epochs = 0.5
[privacy]
accountant = "rdp"
[server]
eval-every = 0
weighting = "uniform"
[advertiser-dp]
enabled = true
target-epsilon = 10.0
clipping-norm = 0.1
adaptive-clipping = true
clipped-count-stddev = 2.0
"""


@pytest.mark.slow
def test_simulation_with_record_and_advertiser_dp(tmp_path, data_dir):
    config = tmp_path / "config.toml"
    config.write_text(SIMULATION_CONFIG, encoding="utf-8")
    run_dir = tmp_path / "run"
    args = [
        sys.executable, "-m", "common.cli", "simulate",
        "--config", str(config),
        "--data-dir", str(data_dir),
        "--output", str(run_dir),
        "--num-rounds", "2",
        "--num-clients", "2",
        "--max-examples-per-client", "16",
    ]  # fmt: skip
    result = subprocess.run(
        args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]

    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["units"] == ["record", "advertiser"]
    assert privacy["dp_enabled"] is True
    for client in privacy["clients"].values():
        assert 0 < client["epsilon"] <= 8.0
        assert client["rounds_joined"] == [1, 2]
    advertiser = privacy["advertiser"]
    assert advertiser["noise_multiplier_calibrated"] is True
    assert advertiser["rounds_accounted"] == 2
    assert advertiser["planned_sample_rate"] == 1.0
    # Two rounds at q = 1 were planned, so the run spends the whole target.
    assert advertiser["epsilon"] == pytest.approx(10.0, rel=0.01)
    assert advertiser["epsilon"] <= 10.0
    assert [entry["server_round"] for entry in advertiser["rounds"]] == [1, 2]
    assert advertiser["rounds"][0]["clipping_norm"] == 0.1

    report = (run_dir / "report.md").read_text()
    assert "- unit: `record`, `advertiser`" in report
    assert "### Advertiser-level DP" in report


def test_skipped_round_not_counted(tmp_path, caplog):
    # 3 of 5 clients sampled per round; in round 2 two of them stay silent, so one update
    # arrives, below min-train-nodes = 2: the adapter is kept and no noised output leaves.
    cfg = loop_config(tmp_path)
    grid = LocalGrid(synthetic_client_app(cfg), 5)
    silenced: set[int] = set()

    def silence_in_round_2(message) -> None:
        if message.metadata.message_type != "train":
            return
        if int(message.content["config"]["server-round"]) == 2 and len(silenced) < 2:
            silenced.add(grid.partitions[message.metadata.dst_node_id])  # first two sampled
        grid.silent = silenced if int(message.content["config"]["server-round"]) == 2 else set()

    grid.on_message = silence_in_round_2
    with caplog.at_level("WARNING"):
        run_rounds(grid, cfg, tmp_path)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["aggregated"] for row in rows] == [True, False, True]
    assert rows[1]["num_accepted"] == 1
    advertiser = json.loads((tmp_path / "privacy.json").read_text())["advertiser"]
    assert advertiser["rounds_accounted"] == 2
    assert [entry["server_round"] for entry in advertiser["rounds"]] == [1, 3]
    assert rows[1]["advertiser_epsilon"] == pytest.approx(rows[0]["advertiser_epsilon"])
    assert rows[2]["advertiser_epsilon"] > rows[1]["advertiser_epsilon"]


def test_sampling_above_plan_warns(tmp_path, caplog):
    # Planned for 5 advertisers, but only 3 nodes are connected: 3 of 3 sampled is rate 1.
    cfg = loop_config(tmp_path).replace(server={"num_rounds": 1, "min_available_nodes": 2})
    with caplog.at_level("WARNING"):
        run_rounds(LocalGrid(synthetic_client_app(cfg), 3), cfg, tmp_path)
    assert "above the planned 0.6 from data.num-clients: epsilon grows faster" in caplog.text
