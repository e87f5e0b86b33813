"""Advertiser-level DP under secure aggregation: clients clip and noise, the server sums.

The clients are the synthetic ones of ``local_grid`` (seeded updates of L2 norm about 4,
no training) with the real secure aggregation handlers of the ClientApp, so every client
runs :mod:`client.distributed_dp` and every round is a real SecAgg+ session. Noise comes
from seeded generators (``privacy.secure-mode`` off), so runs repeat exactly.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from local_grid import LocalGrid, ServerStopped, synthetic_client_app
from opacus.accountants import create_accountant

from client.distributed_dp import noise_generator, round_noise_shares
from common.config import ConfigError, RunConfig
from common.secagg import records
from common.secagg.fixed_point import FixedPointConfig, decode_sum
from common.secagg.messages import SetupMessage
from server.aggregation import GlobalAdapter
from server.central_dp import (
    CLIPPING_NORM_CONFIG_KEY,
    AdvertiserDP,
    adapt_clipping_norm,
    gaussian_noise,
)
from server.checkpoint import load_checkpoint
from server.loop import run_rounds
from simulations.report import write_report

REPO_ROOT = Path(__file__).resolve().parent.parent

Z = 0.5
CLIP = 0.5
# Relative tolerance on an empirical standard deviation over the ~166k adapter coordinates:
# its standard error is about 1 / sqrt(2 * 166k) = 0.17 %, so 2 % is more than 10 of them.
STD_TOLERANCE = 0.02


def ddp_config(tmp_path: Path, *, advertiser: dict | None = None, **server) -> RunConfig:
    return RunConfig.from_dict(
        {
            "seed": 0,
            "output": str(tmp_path),
            "data": {"num-clients": 5},
            "privacy": {"dp": False},
            "server": {
                "num-rounds": 1,
                "eval-every": 0,
                "weighting": "uniform",
                "secure-aggregation": True,
                **server,
            },
            "advertiser-dp": {
                "enabled": True,
                "noise-multiplier": Z,
                "clipping-norm": CLIP,
                **(advertiser or {}),
            },
        }
    )


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def advertiser_block(run_dir: Path) -> dict:
    return json.loads((run_dir / "privacy.json").read_text())["advertiser"]


def masked_input_messages(grid: LocalGrid, server_round: int) -> list:
    return [
        message
        for message in grid.sent
        if message.metadata.message_type == f"train.{records.MASKED_INPUT_ACTION}"
        and int(message.content["config"]["server-round"]) == server_round
    ]


def adapter_sent(grid: LocalGrid, server_round: int) -> dict[str, np.ndarray]:
    message = masked_input_messages(grid, server_round)[0]
    return {k: a.numpy().astype(np.float64) for k, a in message.content["arrays"].items()}


def clipped_delta(update: dict, start: dict, clipping_norm: float) -> dict[str, np.ndarray]:
    delta = {name: np.asarray(update[name], np.float64) - start[name] for name in start}
    norm = math.sqrt(sum(float(np.sum(value**2)) for value in delta.values()))
    factor = min(1.0, clipping_norm / norm)
    return {name: value * factor for name, value in delta.items()}


def residual(result: dict, start: dict, expected_mean: dict) -> np.ndarray:
    """What the round added beyond the exact mean of clipped updates, flattened."""
    return np.concatenate(
        [
            (np.asarray(result[name], np.float64) - start[name] - expected_mean[name]).ravel()
            for name in sorted(start)
        ]
    )


def scale_update(factor: float):
    """Behaviour that scales a synthetic client's step by ``factor``."""

    def behaviour(update: dict, received: dict) -> dict:
        return {name: received[name] + factor * (update[name] - received[name]) for name in update}

    return behaviour


# ---------------------------------------------------------------------------
# The mean and its noise
# ---------------------------------------------------------------------------


def test_noised_mean_matches_clipped_mean(tmp_path):
    # min-train-nodes = 4 of 4 sampled: the shares are calibrated for all four, so the
    # noise on the mean is exactly the central z * C / m.
    cfg = ddp_config(tmp_path, **{"min-train-nodes": 4})
    sent: dict[tuple[int, int], dict] = {}
    grid = LocalGrid(synthetic_client_app(cfg, replies=sent), 4)
    result = run_rounds(grid, cfg, tmp_path)

    (row,) = metrics(tmp_path)
    assert row["aggregated"] is True
    assert row["num_accepted"] == 4
    start = adapter_sent(grid, 1)
    clipped = [clipped_delta(sent[(p, 1)], start, CLIP) for p in range(4)]
    expected_mean = {name: sum(c[name] for c in clipped) / 4 for name in start}
    noise = residual(result, start, expected_mean)

    planned = Z * CLIP / 4
    assert noise.size > 100_000
    assert np.std(noise) == pytest.approx(planned, rel=STD_TOLERANCE)
    assert abs(np.mean(noise)) < 5 * planned / math.sqrt(noise.size)
    (release,) = advertiser_block(tmp_path)["rounds"]
    assert release["noise_stddev"] == pytest.approx(planned)
    assert release["noise_share_stddev"] == pytest.approx(Z * CLIP / math.sqrt(4))
    assert release["min_survivors"] == release["num_contributors"] == 4
    # Every client received the round's clipping norm in its train config.
    for message in masked_input_messages(grid, 1):
        assert message.content["config"][CLIPPING_NORM_CONFIG_KEY] == CLIP


def test_dropout_within_threshold_uses_documented_rule(tmp_path, caplog):
    # 5 sampled, threshold ceil(0.6 * 5) = 3 > min-train-nodes = 2, so the shares are
    # calibrated for 3 survivors. Client 1 vanishes after sharing its keys: 4 survive.
    cfg = ddp_config(tmp_path)
    sent: dict[tuple[int, int], dict] = {}
    grid = LocalGrid(
        synthetic_client_app(cfg, replies=sent), 5, dropouts={1: records.MASKED_INPUT_ACTION}
    )
    with caplog.at_level("WARNING"):
        result = run_rounds(grid, cfg, tmp_path)

    (row,) = metrics(tmp_path)
    assert row["aggregated"] is True
    assert row["num_accepted"] == 4
    assert "client client-001: masked_input: no reply" in caplog.text

    # The sum of the 4 survivors' clipped updates over the 5 sampled (a dropout counts as
    # a zero update), plus 4 shares of z * C / sqrt(3).
    start = adapter_sent(grid, 1)
    survivors = [0, 2, 3, 4]
    clipped = [clipped_delta(sent[(p, 1)], start, CLIP) for p in survivors]
    expected_mean = {name: sum(c[name] for c in clipped) / 5 for name in start}
    noise = residual(result, start, expected_mean)
    realised = Z * CLIP * math.sqrt(4 / 3) / 5
    assert np.std(noise) == pytest.approx(realised, rel=STD_TOLERANCE)
    assert np.std(noise) > Z * CLIP / 5  # never below the planned central noise

    advertiser = advertiser_block(tmp_path)
    (release,) = advertiser["rounds"]
    assert release["num_sampled"] == 5
    assert release["num_contributors"] == 4
    assert release["min_survivors"] == advertiser["min_survivors"] == 3
    assert release["noise_stddev"] == pytest.approx(realised)
    # The accountant composes the planned z for the round, whatever the survivors.
    accountant = create_accountant(mechanism="rdp")
    accountant.history = [(Z, 1.0, 1)]
    assert advertiser["rounds_accounted"] == 1
    assert advertiser["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5))


def test_too_few_survivors_fail_before_unmasking(tmp_path, caplog):
    # min-train-nodes = 4 of 5 sampled: two dropouts leave 3 shares, below the 4 planned.
    cfg = ddp_config(tmp_path, **{"min-train-nodes": 4})
    dropouts = {p: records.MASKED_INPUT_ACTION for p in (0, 3)}
    grid = LocalGrid(synthetic_client_app(cfg), 5, dropouts=dropouts)
    with caplog.at_level("ERROR"):
        run_rounds(grid, cfg, tmp_path)

    (row,) = metrics(tmp_path)
    assert row["aggregated"] is False
    assert row["secagg_failed_stage"] == "masked_input"
    assert "fewer than the 4 survivors the noise shares are calibrated for" in caplog.text
    advertiser = advertiser_block(tmp_path)
    assert advertiser["rounds_accounted"] == 0
    assert advertiser["epsilon"] == 0.0


# ---------------------------------------------------------------------------
# What the server receives
# ---------------------------------------------------------------------------


def test_server_never_holds_unclipped_or_unnoised_update(tmp_path, monkeypatch):
    def no_plain_aggregation(self, *args, **kwargs):
        raise AssertionError("the plain aggregation path ran under secure aggregation")

    def no_server_noise(self, *args, **kwargs):
        raise AssertionError("the server added noise although the clients did")

    monkeypatch.setattr(GlobalAdapter, "aggregate", no_plain_aggregation)
    monkeypatch.setattr(GlobalAdapter, "apply_secure_mean", no_plain_aggregation)
    monkeypatch.setattr(AdvertiserDP, "privatize", no_server_noise)
    cfg = ddp_config(tmp_path)
    sent: dict[tuple[int, int], dict] = {}
    grid = LocalGrid(synthetic_client_app(cfg, replies=sent), 4)
    run_rounds(grid, cfg, tmp_path)
    assert metrics(tmp_path)[0]["aggregated"] is True

    # Each reply carries no adapter tensors, and each masked vector decodes to values
    # spread over the whole range, uncorrelated with the client's clipped delta.
    shares = AdvertiserDP.from_run_config(cfg).noise_shares(min_survivors=3)
    encoding = FixedPointConfig(
        clipping_range=shares.fixed_point_range, max_clients=4, modulus_bits=64
    )
    start = adapter_sent(grid, 1)
    masked_replies = 0
    for reply in grid.replies:
        content = reply.content
        assert "arrays" not in content.array_records
        if records.MASKED_INPUT_KEY not in content.array_records:
            continue
        masked_replies += 1
        (vector,) = [
            array.numpy() for array in content.array_records[records.MASKED_INPUT_KEY].values()
        ]
        decoded = decode_sum(vector, 1, encoding)[:-1]  # without the weight coordinate
        partition = grid.partitions[reply.metadata.src_node_id]
        clipped = clipped_delta(sent[(partition, 1)], start, CLIP)
        flat = np.concatenate([clipped[name].ravel() for name in sorted(clipped)])
        assert np.std(decoded) > 0.1 * encoding.clipping_range
        assert abs(np.corrcoef(decoded, flat)[0, 1]) < 0.05
    assert masked_replies == 4


def test_client_rejects_session_without_room_for_noise():
    cfg = ddp_config(Path("unused"))
    shares_needed = AdvertiserDP.from_run_config(cfg).noise_shares(min_survivors=3)
    setup = SetupMessage(
        session_id=b"\0" * 16,
        participants=(0, 1, 2, 3, 4),
        neighbours=(1, 2, 3, 4),
        threshold=3,
        clipping_range=shares_needed.fixed_point_range,
        modulus_bits=64,
        quantization_bits=40,
        layout=(),
    )
    config = {"server-round": 1, CLIPPING_NORM_CONFIG_KEY: CLIP}
    assert round_noise_shares(cfg, config, setup) == shares_needed

    narrow = SetupMessage(**{**setup.__dict__, "clipping_range": CLIP})
    with pytest.raises(ValueError, match="fixed-point range 0.5 is below"):
        round_noise_shares(cfg, config, narrow)
    with pytest.raises(ValueError, match="invalid train config advertiser-dp-clipping-norm"):
        round_noise_shares(cfg, {"server-round": 1}, setup)


def test_server_values_cannot_lower_the_noise_ratio():
    # The server sends C and, with the session, the threshold. Each share grows in
    # proportion to C. A higher threshold shrinks each share, but the client then requires
    # at least that many survivors, so the noise on their sum stays at or above z_Δ C.
    cfg = ddp_config(Path("unused"), **{"min-train-nodes": 2})
    one_share = AdvertiserDP.from_run_config(cfg).noise_shares(min_survivors=1)
    z_update = one_share.update_stddev / CLIP  # z_Δ, the update noise multiplier
    base = SetupMessage(
        session_id=b"\0" * 16,
        participants=(0, 1, 2, 3, 4, 5, 6),
        neighbours=(1, 2, 3, 4, 5, 6),
        threshold=4,
        clipping_range=1e6,
        modulus_bits=64,
        quantization_bits=40,
        layout=(),
    )
    shares = {}
    for clip in (0.5, 2.0):
        for threshold in (4, 6):
            setup = SetupMessage(**{**base.__dict__, "threshold": threshold})
            config = {"server-round": 1, CLIPPING_NORM_CONFIG_KEY: clip}
            shares[clip, threshold] = round_noise_shares(cfg, config, setup)

    for threshold in (4, 6):
        ratio = shares[2.0, threshold].update_stddev / shares[0.5, threshold].update_stddev
        assert ratio == pytest.approx(4.0)
    for (clip, threshold), share in shares.items():
        assert share.min_survivors == threshold  # above min-train-nodes = 2
        planned = z_update * clip
        assert math.sqrt(threshold) * share.update_stddev == pytest.approx(planned)
        for survivors in range(threshold, 8):
            assert math.sqrt(survivors) * share.update_stddev >= planned * (1 - 1e-12)


# ---------------------------------------------------------------------------
# Adaptive clipping with a securely aggregated count
# ---------------------------------------------------------------------------

ADAPTIVE = {"adaptive-clipping": True, "clipped-count-stddev": 0.3, "clipping-norm": 1.0}
# Clients 0 and 1 take steps of norm about 0.4 (within C = 1), the others about 4.
BEHAVIOURS = {0: scale_update(0.1), 1: scale_update(0.1)}


def test_noised_count_moves_clip_norm_like_central_mode(tmp_path, monkeypatch):
    # With every noise draw zeroed, the distributed and the central mode must release the
    # same unclipped fractions, move C the same way and reach the same adapter.
    def no_noise(shape, stddev, *, rng):
        return np.zeros(shape)

    monkeypatch.setattr("client.distributed_dp.gaussian_noise", no_noise)
    monkeypatch.setattr("server.central_dp.gaussian_noise", no_noise)
    runs = {}
    for name, secure in (("central", False), ("distributed", True)):
        run_dir = tmp_path / name
        cfg = ddp_config(
            run_dir, advertiser=ADAPTIVE, **{"num-rounds": 3, "secure-aggregation": secure}
        )
        adapter = run_rounds(
            LocalGrid(synthetic_client_app(cfg, behaviours=BEHAVIOURS), 5), cfg, run_dir
        )
        runs[name] = (adapter, advertiser_block(run_dir))

    central_adapter, central = runs["central"]
    distributed_adapter, distributed = runs["distributed"]
    assert central["noise_added_by"].startswith("server")
    assert distributed["noise_added_by"].startswith("clients")
    fractions = [entry["unclipped_fraction"] for entry in distributed["rounds"]]
    assert fractions[0] == pytest.approx(2 / 5, abs=1e-9)
    assert fractions == pytest.approx([e["unclipped_fraction"] for e in central["rounds"]])
    norms = [entry["clipping_norm"] for entry in distributed["rounds"]]
    assert norms == pytest.approx([entry["clipping_norm"] for entry in central["rounds"]])
    assert distributed["next_clipping_norm"] == pytest.approx(central["next_clipping_norm"])
    assert norms[1] == pytest.approx(
        adapt_clipping_norm(1.0, unclipped_fraction=0.4, target_quantile=0.5, learning_rate=0.2)
    )
    for name, value in central_adapter.items():
        np.testing.assert_allclose(distributed_adapter[name], value, rtol=0, atol=1e-6)


def test_noised_count_is_sum_of_client_shares(tmp_path):
    cfg = ddp_config(tmp_path, advertiser=ADAPTIVE)
    grid = LocalGrid(synthetic_client_app(cfg, behaviours=BEHAVIOURS), 5)
    run_rounds(grid, cfg, tmp_path)

    # The seeded count share of each client, as the client drew it: 5 shares of
    # sigma_b / sqrt(3) on the centred bits 1, 1, 0, 0, 0.
    count_stddev = 0.3 / math.sqrt(3)
    noise = sum(
        float(
            gaussian_noise((1,), count_stddev, rng=noise_generator(cfg, f"client-{p:03d}", 1, 2))[0]
        )
        for p in range(5)
    )
    (release,) = advertiser_block(tmp_path)["rounds"]
    assert release["unclipped_fraction"] == pytest.approx((2 + noise) / 5, abs=1e-9)
    assert noise != 0.0
    assert advertiser_block(tmp_path)["next_clipping_norm"] == pytest.approx(
        adapt_clipping_norm(
            1.0,
            unclipped_fraction=release["unclipped_fraction"],
            target_quantile=0.5,
            learning_rate=0.2,
        )
    )


def test_resume_keeps_distributed_clipping_state(tmp_path):
    straight_dir, stopped_dir = tmp_path / "straight", tmp_path / "stopped"
    straight_cfg = ddp_config(straight_dir, advertiser=ADAPTIVE, **{"num-rounds": 3})
    expected = run_rounds(
        LocalGrid(synthetic_client_app(straight_cfg, behaviours=BEHAVIOURS), 5),
        straight_cfg,
        straight_dir,
    )
    cfg = ddp_config(stopped_dir, advertiser=ADAPTIVE, **{"num-rounds": 3})
    app = synthetic_client_app(cfg, behaviours=BEHAVIOURS)
    with pytest.raises(ServerStopped):
        run_rounds(LocalGrid(app, 5, stop_after_round=2), cfg, stopped_dir)
    saved = load_checkpoint(stopped_dir).advertiser_dp
    assert len(saved["releases"]) == 1
    assert saved["releases"][0]["noise_added_by"] == "clients"

    resumed = run_rounds(LocalGrid(app, 5, node_id_offset=4242), cfg, stopped_dir)
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name])
    final = load_checkpoint(stopped_dir).advertiser_dp
    reference = load_checkpoint(straight_dir).advertiser_dp
    assert final["history"] == reference["history"] == [[Z, 1.0, 3]]
    assert final["clipping_norm"] == reference["clipping_norm"]
    assert final["releases"] == reference["releases"]


# ---------------------------------------------------------------------------
# Config, privacy.json and report
# ---------------------------------------------------------------------------


def test_config_accepts_both_and_rejects_unsound_rest():
    both = {
        "server": {"secure-aggregation": True, "weighting": "uniform"},
        "advertiser-dp": {"enabled": True, "noise-multiplier": 1.0},
    }
    cfg = RunConfig.from_dict(both)
    assert cfg.server.secure_aggregation and cfg.advertiser_dp.enabled
    cases = [
        ({"max-update-norm": 2.0}, "invalid server.max-update-norm = 2.0"),
        ({"norm-bound": 2.0}, "invalid server.norm-bound = 2.0"),
        ({"weighting": "examples"}, "invalid server.weighting = 'examples'"),
    ]
    for server, message in cases:
        values = {**both, "server": {**both["server"], **server}}
        with pytest.raises(ConfigError, match=message):
            RunConfig.from_dict(values)


def test_privacy_file_and_report_state_distributed_noise(tmp_path):
    cfg = ddp_config(tmp_path, advertiser=ADAPTIVE)
    run_rounds(LocalGrid(synthetic_client_app(cfg), 5), cfg, tmp_path)
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    assert privacy["units"] == ["advertiser"]
    assert privacy["secure_aggregation"] is True
    advertiser = privacy["advertiser"]
    assert advertiser["noise_added_by"] == "clients under secure aggregation (distributed)"
    assert advertiser["min_survivors"] == 3
    assert advertiser["noise_share_stddev"] == pytest.approx(
        advertiser["update_noise_multiplier"] * 1.0 / math.sqrt(3)
    )
    assert advertiser["count_share_stddev"] == pytest.approx(0.3 / math.sqrt(3))
    assert "client-" not in json.dumps(advertiser)
    assert any("subtract their own shares" in item for item in privacy["not_protected"])
    assert not any("before clipping and noise" in item for item in privacy["not_protected"])

    text = write_report(tmp_path).read_text()
    assert "- noise: added by the clients under secure aggregation (distributed)" in text
    assert "calibrated for at least 3 survivors" in text
    assert "Clients clip to each round's advertiser-level clipping norm" in text
    assert privacy["secure_aggregation_settings"]["client_clip_norm"] is None


def test_secure_config_is_main_plus_both_units():
    configs = REPO_ROOT / "simulations" / "configs"
    main = RunConfig.from_toml(configs / "main.toml").to_dict()
    secure_cfg = RunConfig.from_toml(configs / "secure.toml")
    secure = secure_cfg.to_dict()
    differing = {
        (section, key)
        for section, table in secure.items()
        if isinstance(table, dict)
        for key, value in table.items()
        if main[section][key] != value
    }
    assert {key for section, key in differing if section != "advertiser-dp"} == {
        "secure-aggregation",
        "weighting",
    }
    assert {section for section, _ in differing} == {"server", "advertiser-dp"}
    assert secure_cfg.server.secure_aggregation and secure_cfg.advertiser_dp.enabled
    assert secure_cfg.privacy.dp
    assert AdvertiserDP.from_run_config(secure_cfg).noise_multiplier > 0


SIMULATION_CONFIG = """\
seed = 0
[model]
max-new-tokens = 8
[data]
num-clients = 3
max-examples-per-client = 16
eval-sample = 2
[train]
batch-size = 8
local-epochs = 0.5
[privacy]
accountant = "rdp"
[server]
num-rounds = 2
eval-every = 0
weighting = "uniform"
secure-aggregation = true
[advertiser-dp]
enabled = true
noise-multiplier = 1.0
clipping-norm = 0.1
adaptive-clipping = true
clipped-count-stddev = 1.0
"""


@pytest.mark.slow
def test_simulation_with_both_units_and_secure_aggregation(tmp_path, data_dir):
    config = tmp_path / "config.toml"
    config.write_text(SIMULATION_CONFIG, encoding="utf-8")
    run_dir = tmp_path / "run"
    args = [
        sys.executable, "-m", "common.cli", "simulate",
        "--config", str(config), "--data-dir", str(data_dir), "--output", str(run_dir),
    ]  # fmt: skip
    result = subprocess.run(
        args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]

    rows = metrics(run_dir)
    assert [row["aggregated"] for row in rows] == [True, True]
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["units"] == ["record", "advertiser"]
    assert privacy["dp_enabled"] is True
    assert privacy["secure_aggregation"] is True
    for client in privacy["clients"].values():
        assert client["epsilon"] > 0
        assert client["rounds_joined"] == [1, 2]
    advertiser = privacy["advertiser"]
    assert advertiser["noise_added_by"] == "clients under secure aggregation (distributed)"
    assert advertiser["rounds_accounted"] == 2
    assert advertiser["min_survivors"] == 2  # threshold ceil(0.6 * 3) = min-train-nodes
    assert [entry["num_contributors"] for entry in advertiser["rounds"]] == [3, 3]
    report = (run_dir / "report.md").read_text()
    assert "- unit: `record`, `advertiser`" in report
    assert "added by the clients under secure aggregation (distributed)" in report
