"""Server checkpoint after each round, written atomically, and what resuming from it needs.

``RUN_DIR/checkpoint/`` contains two files:

- ``arrays.npz``: the global state (``global/<name>``), the server optimizer state
  (``optimizer/<name>``) and the array parts of the random number generator states
  (``rng/python``, ``rng/sampler``, ``rng/numpy``, ``rng/torch``);
- ``state.json``: the last completed round, the strategy name, the run config, the
  scalar parts of the generator states, the per-client privacy entries that the
  server reports in ``privacy.json`` and, with advertiser-level DP, the server's clipping
  norm and accountant history (:meth:`server.central_dp.AdvertiserDP.state_dict`).

Both are written to a temporary sibling folder, fsynced and renamed over the old
checkpoint, so a crash leaves either the previous or the new checkpoint, never a mix.
The round loop appends the round's line to ``metrics.jsonl`` before it writes the
checkpoint, so on resume :func:`drop_rounds_after` removes the lines of a round that
has no checkpoint, and that round runs again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.adapter import Arrays
from common.atomic import write_bytes_atomic

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_VERSION = 1

# Run config keys that name places rather than the computation: a run folder moved to
# another machine resumes with the paths of its new config.
_LOCATION_KEYS = ("output", "data.data-dir", "privacy.ledger-dir")


@dataclass
class Checkpoint:
    """Everything the server needs to continue after ``server_round``."""

    server_round: int
    strategy: str
    global_state: Arrays
    optimizer_state: dict[str, np.ndarray]
    config: dict[str, Any]
    rng: dict[str, Any] = field(default_factory=dict)
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    advertiser_dp: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Random number generators
# ---------------------------------------------------------------------------


def capture_rng(sampler: random.Random) -> dict[str, Any]:
    """States of Python's ``random``, the node ``sampler``, NumPy's and torch's global RNGs."""
    py_version, py_internal, py_gauss = random.getstate()
    sampler_version, sampler_internal, sampler_gauss = sampler.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "python": (py_version, np.asarray(py_internal, np.uint32), py_gauss),
        "sampler": (sampler_version, np.asarray(sampler_internal, np.uint32), sampler_gauss),
        "numpy": (np_kind, np.asarray(np_keys, np.uint32), np_pos, np_has_gauss, np_gauss),
        "torch": torch.get_rng_state().numpy().copy(),
    }


def restore_rng(state: Mapping[str, Any], sampler: random.Random) -> None:
    """Set the generators captured by :func:`capture_rng` back to those states."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal), gauss))
    version, internal, gauss = state["sampler"]
    sampler.setstate((version, tuple(int(x) for x in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.from_numpy(np.asarray(state["torch"], np.uint8).copy()))


def _split_rng(rng: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Split generator states into arrays (for the npz) and scalars (for the JSON)."""
    arrays = {
        "rng/python": rng["python"][1],
        "rng/sampler": rng["sampler"][1],
        "rng/numpy": rng["numpy"][1],
        "rng/torch": rng["torch"],
    }
    scalars = {
        "python": [rng["python"][0], rng["python"][2]],
        "sampler": [rng["sampler"][0], rng["sampler"][2]],
        "numpy": [rng["numpy"][0], *rng["numpy"][2:]],
    }
    return arrays, scalars


def _join_rng(arrays: Mapping[str, np.ndarray], scalars: Mapping[str, Any]) -> dict[str, Any]:
    kind, pos, has_gauss, cached = scalars["numpy"]
    return {
        "python": (scalars["python"][0], arrays["rng/python"], scalars["python"][1]),
        "sampler": (scalars["sampler"][0], arrays["rng/sampler"], scalars["sampler"][1]),
        "numpy": (kind, arrays["rng/numpy"], int(pos), int(has_gauss), float(cached)),
        "torch": arrays["rng/torch"],
    }


# ---------------------------------------------------------------------------
# Writing and reading
# ---------------------------------------------------------------------------


def _savez(handle, arrays: Mapping[str, np.ndarray]) -> None:
    # NumPy's stubs read **arrays as possibly carrying allow_pickle, hence the ignore.
    np.savez(handle, **arrays)  # type: ignore[arg-type]


def _fsync_write(path: Path, write) -> None:
    with path.open("wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(run_dir: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``run_dir/checkpoint`` atomically and return its path."""
    run_dir = Path(run_dir)
    target = run_dir / CHECKPOINT_DIR
    rng_arrays, rng_scalars = _split_rng(checkpoint.rng)
    arrays = {f"global/{key}": value for key, value in checkpoint.global_state.items()}
    arrays.update({f"optimizer/{key}": value for key, value in checkpoint.optimizer_state.items()})
    arrays.update(rng_arrays)
    state = {
        "version": CHECKPOINT_VERSION,
        "server_round": checkpoint.server_round,
        "strategy": checkpoint.strategy,
        "config": checkpoint.config,
        "rng": rng_scalars,
        "clients": checkpoint.clients,
        "advertiser_dp": checkpoint.advertiser_dp,
    }

    run_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_DIR}-", dir=run_dir))
    try:
        _fsync_write(tmp_dir / "arrays.npz", lambda handle: _savez(handle, arrays))
        payload = json.dumps(state, indent=2, sort_keys=True).encode("utf-8")
        _fsync_write(tmp_dir / "state.json", lambda handle: handle.write(payload))
        old_dir = run_dir / f".{CHECKPOINT_DIR}-old"
        shutil.rmtree(old_dir, ignore_errors=True)
        if target.exists():
            os.replace(target, old_dir)
        os.replace(tmp_dir, target)
        shutil.rmtree(old_dir, ignore_errors=True)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def load_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """Read the checkpoint of ``run_dir``, or return None when the run has none yet.

    A crash between the two renames of :func:`save_checkpoint` leaves only the previous
    checkpoint, under ``.checkpoint-old``; it is used then.
    """
    run_dir = Path(run_dir)
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        folder = run_dir / f".{CHECKPOINT_DIR}-old"
        if not folder.is_dir():
            return None
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        with np.load(folder / "arrays.npz", allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"checkpoint {folder} is unreadable ({err}): restore the run folder from a "
            "backup, or start a new run in another folder"
        ) from None
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint {folder} has version {state.get('version')!r}, expected "
            f"{CHECKPOINT_VERSION}: resume it with the fedads version that wrote it"
        )
    return Checkpoint(
        server_round=int(state["server_round"]),
        strategy=str(state["strategy"]),
        global_state={k[7:]: v for k, v in arrays.items() if k.startswith("global/")},
        optimizer_state={k[10:]: v for k, v in arrays.items() if k.startswith("optimizer/")},
        config=state["config"],
        rng=_join_rng(arrays, state["rng"]),
        clients=state.get("clients", {}),
        advertiser_dp=state.get("advertiser_dp", {}),
    )


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Flat ``section.key`` names whose values differ, ignoring paths (``_LOCATION_KEYS``)."""

    def flatten(values: Mapping[str, Any]) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in values.items():
            if isinstance(value, Mapping):
                flat.update({f"{key}.{sub}": item for sub, item in value.items()})
            else:
                flat[key] = value
        return flat

    old, new = flatten(saved), flatten(current)
    keys = sorted(set(old) | set(new))
    return [key for key in keys if key not in _LOCATION_KEYS and old.get(key) != new.get(key)]


def drop_rounds_after(metrics_path: Path, server_round: int) -> int:
    """Remove lines of rounds after ``server_round`` from ``metrics.jsonl``; return how many.

    The file is rewritten atomically, and only when a line has to go. A line repeated for
    the same round keeps its first copy, and a line cut short by a crash is dropped.
    """
    if not metrics_path.exists():
        return 0
    lines = metrics_path.read_text(encoding="utf-8").splitlines()
    kept: list[str] = []
    seen: set[int] = set()
    for line in lines:
        if not line.strip():
            continue
        try:
            row_round = int(json.loads(line)["round"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if row_round <= server_round and row_round not in seen:
            kept.append(line)
            seen.add(row_round)
    dropped = len([line for line in lines if line.strip()]) - len(kept)
    if dropped:
        text = "".join(line + "\n" for line in kept)
        write_bytes_atomic(metrics_path, text.encode("utf-8"))
    return dropped
