"""Secure aggregation in the round loop, over in-process Message API exchanges.

The clients are the synthetic ones of ``local_grid`` (seeded updates, no training), with
the real secure aggregation handlers of the ClientApp. Dropouts are injected by
:class:`local_grid.LocalGrid`, which stops a node's replies from a chosen stage on.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from local_grid import LocalGrid, nan_update, synthetic_client_app

from common.config import ConfigError, RunConfig
from common.secagg import records
from common.secagg.fixed_point import FixedPointConfig, decode_sum
from server.aggregation import GlobalAdapter
from server.loop import run_rounds
from server.secure_round import fixed_point_range, threshold_for

NORM_BOUND = 20.0  # honest synthetic steps have L2 norm about 4.1


def secure_config(tmp_path, **server) -> RunConfig:
    return RunConfig.from_dict(
        {
            "seed": 0,
            "output": str(tmp_path),
            "privacy": {"dp": False},
            "server": {
                "num-rounds": 2,
                "eval-every": 0,
                "norm-bound": NORM_BOUND,
                "secure-aggregation": True,
                **server,
            },
        }
    )


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def fedavg(initial: dict, updates: list[dict], weights: list[float]) -> dict:
    """Weighted FedAvg of ``updates`` (float64), measured from ``initial``."""
    total = sum(weights)
    return {
        name: np.asarray(initial[name], np.float64)
        + sum(
            w * (np.asarray(u[name], np.float64) - initial[name])
            for u, w in zip(updates, weights, strict=True)
        )
        / total
        for name in initial
    }


def adapter_sent(grid: LocalGrid, server_round: int) -> dict[str, np.ndarray]:
    """The global adapter that the masked-input stage of ``server_round`` carried, float64."""
    for message in grid.sent:
        content = message.content
        if (
            message.metadata.message_type == f"train.{records.MASKED_INPUT_ACTION}"
            and int(content["config"]["server-round"]) == server_round
        ):
            return {k: a.numpy().astype(np.float64) for k, a in content["arrays"].items()}
    raise AssertionError(f"no masked-input message of round {server_round}")


def assert_within(found: dict, expected: dict, bound: float) -> None:
    """Every coordinate within ``bound`` plus float32 rounding of the stored state."""
    for name, value in expected.items():
        slack = bound + 2 * np.spacing(np.abs(np.asarray(value, np.float32)))
        error = np.abs(np.asarray(found[name], np.float64) - value)
        assert np.all(error <= slack), f"{name}: error {error.max():.3g}"


def test_secure_run_matches_plain_fedavg(tmp_path):
    plain_cfg = secure_config(tmp_path / "plain", **{"secure-aggregation": False})
    plain = run_rounds(LocalGrid(synthetic_client_app(plain_cfg), 5), plain_cfg, tmp_path / "plain")
    secure_cfg = secure_config(tmp_path / "secure")
    secure = run_rounds(
        LocalGrid(synthetic_client_app(secure_cfg), 5), secure_cfg, tmp_path / "secure"
    )

    rows = metrics(tmp_path / "secure")
    assert [row["aggregated"] for row in rows] == [True, True]
    assert [row["num_accepted"] for row in rows] == [5, 5]
    bound = sum(row["secagg_error_bound"] for row in rows)
    assert 0 < bound < 1e-6
    assert_within(secure, {k: v.astype(np.float64) for k, v in plain.items()}, bound)


def scaled_by_100(update: dict, received: dict) -> dict:
    """Hostile behaviour: the honest step (norm about 4.1) times 100."""
    return {name: received[name] + 100 * (update[name] - received[name]) for name in update}


def test_secagg_client_clips_update(tmp_path):
    # The server cannot bound a masked update, so each client scales its own delta to
    # server.norm-bound before masking: the secure mean equals the plain run in which the
    # server bounded every update, and not the unbounded mean.
    behaviours = {2: scaled_by_100}
    runs = {}
    for name, server in (
        ("secure", {}),
        ("bounded", {"secure-aggregation": False}),
        ("unbounded", {"secure-aggregation": False, "norm-bound": 0.0}),
    ):
        cfg = secure_config(tmp_path / name, **{"num-rounds": 1, **server})
        grid = LocalGrid(synthetic_client_app(cfg, behaviours=behaviours), 5)
        runs[name] = run_rounds(grid, cfg, tmp_path / name)

    (row,) = metrics(tmp_path / "secure")
    bounded = {k: v.astype(np.float64) for k, v in runs["bounded"].items()}
    assert_within(runs["secure"], bounded, row["secagg_error_bound"])
    gap = max(float(np.max(np.abs(runs["unbounded"][k] - runs["bounded"][k]))) for k in bounded)
    assert gap > 0.01  # the hostile step would have moved the mean far more


def test_server_never_holds_unmasked_update(tmp_path, monkeypatch):
    def no_plain_aggregation(self, updates, *, min_updates):
        raise AssertionError("the plain aggregation path ran under secure aggregation")

    monkeypatch.setattr(GlobalAdapter, "aggregate", no_plain_aggregation)
    cfg = secure_config(tmp_path, **{"num-rounds": 1})
    sent: dict[tuple[int, int], dict] = {}
    grid = LocalGrid(synthetic_client_app(cfg, replies=sent), 4)
    run_rounds(grid, cfg, tmp_path)

    # Everything the server received, reply by reply: no adapter tensors, and each masked
    # vector decodes to noise, not to the client's weighted update delta.
    encoding = FixedPointConfig(
        clipping_range=fixed_point_range(cfg), max_clients=4, modulus_bits=64
    )
    start = adapter_sent(grid, 1)
    masked_replies = 0
    for reply in grid.replies:
        content = reply.content
        assert "arrays" not in content.array_records
        if records.MASKED_INPUT_KEY not in content.array_records:
            assert not content.array_records
            continue
        masked_replies += 1
        (vector,) = [
            array.numpy() for array in content.array_records[records.MASKED_INPUT_KEY].values()
        ]
        assert vector.dtype == np.uint64
        decoded = decode_sum(vector, 1, encoding)[:-1]  # without the weight coordinate
        partition = grid.partitions[reply.metadata.src_node_id]
        update = sent[(partition, 1)]
        weighted_delta = np.concatenate(
            [(10 + partition) * (update[k] - start[k]).ravel() for k in sorted(update)]
        )
        # Masks are uniform over the ring, so the decoded values spread over [-c, c].
        assert np.std(decoded) > 0.1 * encoding.clipping_range
        assert abs(np.corrcoef(decoded, weighted_delta)[0, 1]) < 0.05
    assert masked_replies == 4
    assert metrics(tmp_path)[0]["aggregated"] is True


def test_dropout_within_threshold_is_recovered(tmp_path, caplog):
    # 5 clients, threshold ceil(0.6 * 5) = 3: clients 1 and 3 vanish after sharing keys.
    cfg = secure_config(tmp_path, **{"num-rounds": 1})
    sent: dict[tuple[int, int], dict] = {}
    app = synthetic_client_app(cfg, replies=sent)
    grid = LocalGrid(app, 5, dropouts={1: records.MASKED_INPUT_ACTION, 3: "secagg_unmask"})
    with caplog.at_level("WARNING"):
        result = run_rounds(grid, cfg, tmp_path)

    (row,) = metrics(tmp_path)
    assert row["aggregated"] is True
    assert row["num_accepted"] == 4  # client 3 sent its masked input, then vanished
    assert row["num_failed"] == 2
    assert "client client-001: masked_input: no reply" in caplog.text
    assert "client client-003: unmask: no reply" in caplog.text

    # The result is FedAvg over the four clients whose masked inputs arrived.
    survivors = [0, 2, 3, 4]
    expected = fedavg(
        adapter_sent(grid, 1), [sent[(p, 1)] for p in survivors], [10.0 + p for p in survivors]
    )
    assert_within(result, expected, row["secagg_error_bound"])


def test_dropout_below_threshold_fails_round_safely(tmp_path, caplog):
    # 5 clients, threshold 3: three vanish after sharing keys in round 1 only.
    cfg = secure_config(tmp_path)
    dropouts = {p: records.MASKED_INPUT_ACTION for p in (0, 2, 4)}
    grid = LocalGrid(synthetic_client_app(cfg), 5, dropouts=dropouts, dropout_rounds={1})
    with caplog.at_level("ERROR"):
        run_rounds(grid, cfg, tmp_path)

    first, second = metrics(tmp_path)
    assert first["aggregated"] is False
    assert first["secagg_failed_stage"] == "masked_input"
    assert first["num_accepted"] == 0
    assert "round 1 failed at stage masked_input" in caplog.text
    assert "fewer than threshold=3" in caplog.text
    assert "Keeping the global adapter" in caplog.text

    # Round 2 starts from the unchanged adapter, and all five clients take part again.
    before, after = adapter_sent(grid, 1), adapter_sent(grid, 2)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert second["aggregated"] is True
    assert second["num_accepted"] == 5


def test_non_finite_update_stays_on_client(tmp_path, caplog):
    # The client rejects its own NaN update, so the server recovers it as a dropout.
    cfg = secure_config(tmp_path, **{"num-rounds": 1})
    grid = LocalGrid(synthetic_client_app(cfg, behaviours={2: nan_update}), 4)
    with caplog.at_level("WARNING"):
        run_rounds(grid, cfg, tmp_path)

    (row,) = metrics(tmp_path)
    assert row["aggregated"] is True
    assert row["num_accepted"] == 3
    assert row["num_failed"] == 1
    assert "client client-002: masked_input:" in caplog.text
    assert "NaN or infinite entries" in caplog.text


def test_threshold_follows_fraction_and_graph():
    cfg = RunConfig().replace(server={"secure_aggregation": True, "norm_bound": 1.0})
    assert threshold_for(cfg, 3) == 2
    assert threshold_for(cfg, 5) == 3
    assert threshold_for(cfg, 10) == 6
    sparse = cfg.replace(server={"secagg_num_neighbours": 4})
    assert threshold_for(sparse, 20) == 3  # ceil(0.6 * (4 + 1))
    assert threshold_for(sparse, 5) == 3  # 4 neighbours of 5 is the complete graph


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"secure-aggregation": True}, "server.norm-bound > 0 or server.max-update-norm > 0"),
        (
            {"secure-aggregation": True, "norm-bound": 1.0, "robust": "median"},
            "median and trimmed mean need every update in the clear",
        ),
        (
            {"secure-aggregation": True, "norm-bound": 1.0, "min-train-nodes": 1},
            "a sum of one update is that update",
        ),
        ({"secagg-num-neighbours": 3}, "an even integer >= 2"),
        ({"secagg-threshold-fraction": 0.5}, "0.5 < f <= 1"),
        ({"secagg-modulus-bits": 128}, "an integer from 8 to 64"),
    ],
)
def test_secure_aggregation_config_errors(server, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_dict({"server": server})


def test_secure_aggregation_rejects_mixed_ranks():
    with pytest.raises(ConfigError, match="false when model.client-ranks is set"):
        RunConfig.from_dict(
            {
                "model": {"client-ranks": "4,8"},
                "server": {"secure-aggregation": True, "norm-bound": 1.0},
            }
        )


def test_privacy_file_states_secure_aggregation(tmp_path):
    cfg = secure_config(tmp_path, **{"num-rounds": 1})
    run_rounds(LocalGrid(synthetic_client_app(cfg), 3), cfg, tmp_path)
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    assert privacy["secure_aggregation"] is True
    settings = privacy["secure_aggregation_settings"]
    assert settings["update_validation"].startswith(
        "secure aggregation on: per-client validation moved to clients"
    )
    assert settings["client_clip_norm"] == NORM_BOUND
    assert not any("used no secure aggregation" in item for item in privacy["not_protected"])
    not_protected = " ".join(privacy["not_protected"])
    assert "hides each client's update from an honest-but-curious server only" in not_protected
    assert "The set of clients that take part in each round" in not_protected
