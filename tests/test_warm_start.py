"""Public-data warm start: training, caching by key, config and privacy report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.adapter import get_adapter_arrays
from common.config import ConfigError, RunConfig
from common.model import build_lora_model
from server import warm_start as ws
from server.recorder import RunRecorder, not_protected
from simulations.dataset import federated_data
from simulations.report import _privacy_settings
from simulations.run import check_warm_start_disjoint


def _cfg(data_dir, **warm) -> RunConfig:
    settings = {"file": "trainset_subset.csv", "epochs": 1.0, "batch_size": 8, "max_examples": 24}
    return RunConfig().replace(
        data={"data_dir": str(data_dir)},
        model={"train_head": True},
        warm_start={**settings, **warm},
    )


@pytest.mark.slow
def test_warm_start_trains_then_reuses_cache(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("FEDADS_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _cfg(data_dir)
    model = build_lora_model(cfg.model, seed=cfg.seed)
    fresh = get_adapter_arrays(model)

    arrays, info = ws.warm_start_adapter(cfg, model, tmp_path / "run")

    # 24 records in batches of 8: three AdamW steps, which move every lora_B matrix.
    assert info.num_records == 24
    assert info.steps == 3
    assert set(arrays) == set(fresh)
    assert all(not np.array_equal(arrays[k], fresh[k]) for k in fresh if ".lora_B." in k)
    for key, value in get_adapter_arrays(model).items():
        np.testing.assert_array_equal(value, arrays[key])
    assert (tmp_path / "run" / ws.WARM_START_DIR / "adapter_model.safetensors").is_file()
    assert (tmp_path / "cache" / "warm-start" / info.key / ws.INFO_FILE).is_file()

    # A second run with the same key loads the cached adapter and trains nothing.
    def no_training(*args, **kwargs):
        raise AssertionError("the cached warm start should have been used")

    monkeypatch.setattr(ws, "_train", no_training)
    other = build_lora_model(cfg.model, seed=cfg.seed)
    cached, cached_info = ws.warm_start_adapter(cfg, other, tmp_path / "run2")
    assert cached_info == info
    for key, value in arrays.items():
        np.testing.assert_array_equal(cached[key], value)
    assert (tmp_path / "run2" / ws.WARM_START_DIR / ws.INFO_FILE).is_file()

    # Without the shared cache, the run folder's own copy is used (a resumed run).
    monkeypatch.delenv("FEDADS_CACHE_DIR")
    again, _ = ws.warm_start_adapter(cfg, build_lora_model(cfg.model), tmp_path / "run2")
    for key, value in arrays.items():
        np.testing.assert_array_equal(again[key], value)


def test_key_follows_data_settings_and_model(data_dir):
    cfg = _cfg(data_dir)
    key = ws.warm_start_key(cfg, "a" * 64)
    assert ws.warm_start_key(cfg, "a" * 64) == key
    assert ws.warm_start_key(cfg, "b" * 64) != key
    assert ws.warm_start_key(_cfg(data_dir, epochs=2.0), "a" * 64) != key
    assert ws.warm_start_key(cfg.replace(model={"lora_r": 8}), "a" * 64) != key
    assert ws.warm_start_key(cfg.replace(seed=1), "a" * 64) != key
    # The file's location does not matter, only its bytes (sha256).
    assert ws.warm_start_key(_cfg(data_dir, file="/elsewhere/copy.csv"), "a" * 64) == key


def test_off_by_default_and_returns_none(tmp_path):
    cfg = RunConfig()
    assert not cfg.warm_start.enabled
    assert ws.warm_start_adapter(cfg, None, tmp_path) is None  # type: ignore[arg-type]


def test_missing_public_file_names_path_and_fix(tmp_path):
    records = RunConfig().replace(
        data={"data_dir": str(tmp_path), "dataset": "records"},
        warm_start={"file": "public.jsonl"},
    )
    with pytest.raises(FileNotFoundError, match=r"warm-start.file = 'public.jsonl'.*public.jsonl"):
        ws.public_data_path(records)
    e2e = RunConfig().replace(
        data={"data_dir": str(tmp_path)}, warm_start={"file": "trainset_subset.csv"}
    )
    with pytest.raises(FileNotFoundError, match=r"EnrichedE2E.*--no-warm-start"):
        ws.public_data_path(e2e)


def test_records_format_and_cap(tmp_path):
    path = tmp_path / "public.jsonl"
    path.write_text(
        "".join(
            f'{{"audience": "runners {i}", "ad": "Shoes for runners {i}."}}\n' for i in range(5)
        ),
        encoding="utf-8",
    )
    cfg = RunConfig().replace(
        data={
            "data_dir": str(tmp_path),
            "dataset": "records",
            "source_column": "audience",
            "text_column": "ad",
        },
        warm_start={"file": "public.jsonl", "max_examples": 3},
    )
    found = ws.public_data_path(cfg)
    assert found == path
    records = ws.load_public_records(cfg, found)
    assert [r.source for r in records] == ["runners 0", "runners 1", "runners 2"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("epochs", 0, "warm-start.epochs"),
        ("batch-size", 0, "warm-start.batch-size"),
        ("learning-rate", -1.0, "warm-start.learning-rate"),
        ("max-examples", -1, "warm-start.max-examples"),
    ],
)
def test_config_rejects_bad_values(key, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({"warm-start": {"file": "x.csv", key: value}})


def test_config_round_trips_through_toml():
    cfg = RunConfig.from_dict({"warm-start": {"file": "public.csv", "epochs": 3.0}})
    again = RunConfig.from_dict(cfg.to_dict())
    assert again.warm_start == cfg.warm_start
    assert again.warm_start.enabled


def test_privacy_report_states_the_warm_start(tmp_path, data_dir):
    cfg = _cfg(data_dir)
    described = {
        "file": "trainset_subset.csv",
        "sha256": "0" * 64,
        "num_records": 24,
        "epochs": 1.0,
        "steps": 3,
        "dp": False,
    }
    summary = RunRecorder(tmp_path, cfg, warm_start=described).privacy_summary()
    assert summary["warm_start"] == described
    assert any("without DP on the public records" in item for item in summary["not_protected"])
    assert not any("public records" in item for item in not_protected(RunConfig()))
    lines = "\n".join(_privacy_settings(summary))
    assert "public warm start (no DP): 24 records of `trainset_subset.csv`, 3 steps" in lines
    off = RunRecorder(tmp_path / "off", RunConfig()).privacy_summary()
    assert "public warm start (no DP): off" in "\n".join(_privacy_settings(off))


def test_warm_start_rejects_advertiser_records(data_dir):
    configs = Path(__file__).resolve().parents[1] / "simulations" / "configs"
    main = RunConfig.from_toml(configs / "main.toml")
    cfg = main.replace(data={"data_dir": str(data_dir)})
    data = federated_data(cfg.data, cfg.seed)
    check_warm_start_disjoint(cfg, data)  # the public training-set subset: no shared record

    # The advertisers' own file as the "public" one: every advertiser record is in it.
    leaking = cfg.replace(warm_start={"file": "devset.csv"})
    total = sum(data.partitions.sizes)
    with pytest.raises(ConfigError, match=f"{total} of the advertisers' records"):
        check_warm_start_disjoint(leaking, data)
    check_warm_start_disjoint(cfg.replace(warm_start={"file": ""}), data)
