"""Adapter payload and PEFT round trip with the real MiniLM base model."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file

from common.adapter import (
    BFLOAT16,
    arrays_to_record,
    from_wire,
    get_adapter_arrays,
    payload_bytes,
    record_to_arrays,
    save_adapter,
    set_adapter_arrays,
    to_wire,
    wire_numpy_dtype,
)
from common.config import ModelConfig
from common.model import base_model_bytes, build_lora_model, is_lora_key, load_base_model


@pytest.fixture(scope="module")
def lora_model():
    return build_lora_model(ModelConfig(), seed=0)


def _perturbed(arrays, seed=0):
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in arrays.items()}


def test_payload_holds_only_lora_tensors(lora_model):
    arrays = get_adapter_arrays(lora_model)
    assert arrays
    assert all(is_lora_key(name) for name in arrays)
    # 6 layers x 6 projections, each with lora_A and lora_B.
    assert sum("lora_A" in n for n in arrays) == 36
    assert sum("lora_B" in n for n in arrays) == 36
    assert not any("transform" in n for n in arrays)


def test_payload_is_under_one_percent_of_base_model(lora_model):
    arrays = get_adapter_arrays(lora_model)
    ratio = payload_bytes(arrays) / base_model_bytes(lora_model.get_base_model())
    # r=4 on 36 projections: 165,888 float32 values against about 22.7M base parameters.
    assert payload_bytes(arrays) == 165_888 * 4
    assert ratio < 0.01


def test_array_record_round_trip_keeps_names_and_values(lora_model):
    arrays = _perturbed(get_adapter_arrays(lora_model))
    back = record_to_arrays(arrays_to_record(arrays))
    assert back.keys() == arrays.keys()
    for name in arrays:
        np.testing.assert_array_equal(back[name], arrays[name])


@pytest.mark.parametrize(("dtype", "unit_roundoff"), [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_wire_round_trip_within_rounding_bound(lora_model, dtype, unit_roundoff):
    arrays = _perturbed(get_adapter_arrays(lora_model))
    wire = to_wire(arrays, dtype)
    back = record_to_arrays(arrays_to_record(wire))

    assert back.keys() == arrays.keys()
    assert {value.dtype.name for value in back.values()} == {dtype}
    assert payload_bytes(back) * 2 == payload_bytes(arrays)
    info = ml_dtypes.finfo(wire_numpy_dtype(dtype))
    for name, value in from_wire(back).items():
        assert value.dtype == np.float32, name
        original = arrays[name].astype(np.float64)
        error = np.abs(value.astype(np.float64) - original)
        # Rounding to nearest errs by at most half a unit in the last place, which is
        # relative to the value in the normal range and half the subnormal spacing below it.
        normal = np.abs(original) >= float(info.smallest_normal)
        assert np.all(error[normal] <= unit_roundoff * np.abs(original[normal])), name
        assert np.all(error[~normal] <= float(info.smallest_subnormal) / 2), name


def test_bfloat16_record_restores_dtype_and_bits():
    values = np.array([[1.0, -2.5, 3.0e38], [1.0e-30, 0.0, 0.1]], np.float32)
    wire = values.astype(BFLOAT16)
    record = arrays_to_record({"t": wire})
    assert record["t"].dtype == "bfloat16"

    back = record_to_arrays(record)["t"]
    assert back.dtype == BFLOAT16
    assert back.shape == (2, 3)
    np.testing.assert_array_equal(back.view(np.uint16), wire.view(np.uint16))


def test_declared_bfloat16_with_float32_data_keeps_float32():
    # A sender that labels float32 data as bfloat16 must not have it reinterpreted.
    from flwr.app import Array, ArrayRecord

    honest = arrays_to_record({"t": np.ones((2, 2), np.float32)})["t"]
    mislabelled = Array(dtype="bfloat16", shape=honest.shape, stype=honest.stype, data=honest.data)
    back = record_to_arrays(ArrayRecord({"t": mislabelled}))["t"]
    assert back.dtype == np.float32
    assert back.shape == (2, 2)


def test_saved_adapter_round_trips_through_peft(lora_model, tmp_path):
    arrays = _perturbed(get_adapter_arrays(lora_model), seed=1)
    out = save_adapter(lora_model, arrays, tmp_path / "global_adapter")
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    loaded = PeftModel.from_pretrained(load_base_model("minilm-l6"), str(out))
    loaded_params = dict(loaded.named_parameters())
    for name, value in arrays.items():
        torch.testing.assert_close(loaded_params[name].detach(), torch.from_numpy(value))
    # The identity LM head transform travels with the adapter (modules_to_save).
    stored = load_file(str(out / "adapter_model.safetensors"))
    assert any("transform.dense.weight" in key for key in stored)


def test_save_replaces_previous_adapter(lora_model, tmp_path):
    arrays = get_adapter_arrays(lora_model)
    save_adapter(lora_model, arrays, tmp_path / "a")
    second = _perturbed(arrays, seed=2)
    save_adapter(lora_model, second, tmp_path / "a")
    loaded = PeftModel.from_pretrained(load_base_model("minilm-l6"), str(tmp_path / "a"))
    name = next(iter(second))
    torch.testing.assert_close(
        dict(loaded.named_parameters())[name].detach(), torch.from_numpy(second[name])
    )


def test_mismatched_adapter_is_rejected(lora_model):
    arrays = get_adapter_arrays(lora_model)
    name = next(iter(arrays))
    wrong_shape = dict(arrays)
    wrong_shape[name] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="model.lora-r"):
        set_adapter_arrays(lora_model, wrong_shape)
    missing = dict(arrays)
    missing.pop(name)
    with pytest.raises(KeyError, match="1 missing"):
        set_adapter_arrays(lora_model, missing)
