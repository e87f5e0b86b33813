"""Adapter tensors on the wire and on disk: only trainable LoRA tensors travel."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from peft import PeftModel

Arrays = dict[str, np.ndarray]

# NumPy has no bfloat16 dtype. ml_dtypes registers one (8 exponent bits, 8 significand bits).
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def get_adapter_arrays(model: torch.nn.Module) -> Arrays:
    """Copy the trainable tensors (the LoRA matrices) to float32 NumPy arrays."""
    return {
        name: parameter.detach().cpu().float().numpy().copy()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def set_adapter_arrays(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load adapter tensors into the model's trainable parameters (names and shapes must match)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(arrays))
    unexpected = sorted(set(arrays) - set(params))
    if missing or unexpected:
        raise KeyError(
            f"adapter tensors do not match the model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]} ({len(missing)} missing, {len(unexpected)} unexpected); "
            "check that client and server use the same model.name and model.lora-r"
        )
    with torch.no_grad():
        for name, parameter in params.items():
            value = np.asarray(arrays[name])
            if tuple(value.shape) != tuple(parameter.shape):
                raise ValueError(
                    f"adapter tensor {name} has shape {tuple(value.shape)}, expected "
                    f"{tuple(parameter.shape)}: check model.lora-r on both sides"
                )
            parameter.copy_(torch.from_numpy(value.astype(np.float32)))


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack adapter tensors into a Flower ArrayRecord, keeping their names."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> Arrays:
    """Unpack a Flower ArrayRecord into named NumPy arrays, restoring bfloat16 tensors.

    Flower (1.42) serializes an array with ``np.save``, which stores a bfloat16 array
    as the raw 2-byte type ``|V2``, so ``Array.numpy()`` returns opaque bytes. Arrays
    whose Flower ``dtype`` is ``"bfloat16"`` and whose data has 2-byte items are viewed
    as bfloat16 again. Any other mismatch between the declared dtype and the data is
    left as is, so validation rejects it by its real dtype.
    """
    return {name: _decode_array(array) for name, array in record.items()}


def _decode_array(array: Array) -> np.ndarray:
    value = array.numpy()
    if array.dtype == BFLOAT16.name and value.dtype.kind in "Vu" and value.dtype.itemsize == 2:
        return value.view(BFLOAT16)
    return value


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of the tensor data (the part of a message that grows with the adapter)."""
    return int(sum(np.asarray(value).nbytes for value in arrays.values()))


def record_bytes(record: ArrayRecord) -> int:
    """Serialized size of an ArrayRecord's tensors, read without deserializing them."""
    return int(sum(len(array.data) for array in record.values()))


def wire_numpy_dtype(name: str) -> np.dtype:
    """NumPy dtype for a ``server.wire-dtype`` name (``bfloat16`` is ml_dtypes' type)."""
    if name == "bfloat16":
        return BFLOAT16
    if name in ("float32", "float16"):
        return np.dtype(name)
    raise ValueError(f"invalid wire dtype {name!r}: expected float32, float16 or bfloat16")


def to_wire(arrays: Mapping[str, np.ndarray], dtype: str) -> Arrays:
    """Cast adapter tensors to the wire dtype, rounding to nearest even (float32 stays as is).

    For finite values in the normal range, the relative rounding error is at most
    2^-11 for float16 and 2^-8 for bfloat16 (half a unit in the last place).
    float16 overflows to infinity beyond its maximum 65504, which validation then rejects.
    bfloat16 has float32's exponent range.
    """
    target = wire_numpy_dtype(dtype)
    return {name: np.asarray(value).astype(target, copy=False) for name, value in arrays.items()}


def from_wire(arrays: Mapping[str, np.ndarray]) -> Arrays:
    """Cast received adapter tensors to float32, the dtype that aggregation runs in."""
    return {name: np.asarray(value).astype(np.float32) for name, value in arrays.items()}


def frozen_lora_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the frozen ``lora_A`` matrices (names, shapes, float32 values).

    With FFA-LoRA these matrices never travel. The server sends this digest, so a client
    whose seeded initialization differs (another seed, torch or PEFT version) fails
    loudly instead of training against other ``lora_A`` matrices. Returns the digest of
    nothing when no ``lora_A`` is frozen.
    """
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        if ".lora_A." in name and not parameter.requires_grad:
            value = parameter.detach().cpu().float().contiguous().numpy()
            digest.update(name.encode())
            digest.update(str(value.shape).encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


def save_adapter(model: PeftModel, arrays: Mapping[str, np.ndarray], out_dir: str | Path) -> Path:
    """Save the adapter in PEFT format, replacing ``out_dir`` atomically.

    The folder contains ``adapter_config.json`` and ``adapter_model.safetensors`` and loads with
    ``PeftModel.from_pretrained``. It is written to a temporary sibling first and renamed,
    so a crash never leaves a half-written adapter under ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    set_adapter_arrays(model, arrays)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp_dir))
        old_dir = None
        if out_dir.exists():
            old_dir = out_dir.with_name(f".{out_dir.name}-old")
            shutil.rmtree(old_dir, ignore_errors=True)
            os.replace(out_dir, old_dir)
        os.replace(tmp_dir, out_dir)
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir
