"""Public-data warm start: non-private fine-tuning of the initial global adapter."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from peft import PeftModel
from safetensors.numpy import load_file

from common.adapter import Arrays, get_adapter_arrays, save_adapter, set_adapter_arrays
from common.config import PrivacyConfig, RunConfig, TrainConfig
from common.data import AdRecord, load_records
from common.e2e import ensure_e2e_file, load_e2e
from common.model import load_tokenizer
from server.recorder import write_json_atomic

logger = logging.getLogger(__name__)

WARM_START_DIR = "warm_start"
INFO_FILE = "warm_start.json"
# Bump when the training recipe changes, so that cached adapters of the old one are retrained.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class WarmStartInfo:
    """Record of the warm start's data and settings, written as ``warm_start.json``."""

    file: str
    sha256: str
    num_records: int
    epochs: float
    steps: int
    batch_size: int
    learning_rate: float
    train_loss: float
    seconds: float
    key: str


def public_data_path(cfg: RunConfig) -> Path:
    """Locate ``warm-start.file``: in ``data.data-dir`` unless it is an absolute path.

    For E2E a bare file name is looked up as the dataset's own files are (``DIR/e2e/NAME``
    first), and a known E2E file with a public download is fetched when missing.
    """
    name = cfg.warm_start.file
    path = Path(name).expanduser()
    if cfg.data.dataset == "e2e" and not path.is_absolute() and len(path.parts) == 1:
        try:
            return ensure_e2e_file(Path(cfg.data.data_dir), name)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"warm-start.file = {name!r}: {err}; or run without the public warm start "
                '(--no-warm-start, or warm-start.file = "")'
            ) from None
    if not path.is_absolute():
        path = Path(cfg.data.data_dir) / path
    if not path.is_file():
        raise FileNotFoundError(
            f"warm-start.file = {name!r}: no file at {path}. Put the public records there, "
            'or set warm-start.file = "" to start from the base model'
        )
    return path


def load_public_records(cfg: RunConfig, path: Path) -> list[AdRecord]:
    """Read the public records in the format of ``data.dataset``, capped at ``max-examples``."""
    data = cfg.data
    if data.dataset == "e2e":
        records = load_e2e(path, max_chars=data.max_chars)
    else:
        records = load_records(
            path,
            source_column=data.source_column,
            text_column=data.text_column,
            max_chars=data.max_chars,
        )
    limit = cfg.warm_start.max_examples
    return records[:limit] if limit else records


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


def warm_start_key(cfg: RunConfig, data_sha256: str) -> str:
    """Digest of everything the warm-started adapter depends on.

    Two runs with the same key would train the same adapter (up to floating-point
    differences between machines), so the shared cache may hand one run's result to the other.
    """
    model = cfg.model
    inputs = {
        "recipe": RECIPE_VERSION,
        "data_sha256": data_sha256,
        "dataset": cfg.data.dataset,
        "columns": [cfg.data.source_column, cfg.data.text_column],
        "max_chars": cfg.data.max_chars,
        "warm_start": asdict(cfg.warm_start) | {"file": ""},
        "model": [model.name, model.max_rank, model.lora_alpha, model.max_length],
        "trained": [model.train_head, model.ffa_lora],
        "seed": cfg.seed,
        "versions": [torch.__version__, peft.__version__],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def shared_cache_dir() -> Path | None:
    """``FEDADS_CACHE_DIR/warm-start``, or None when the variable is unset (no shared cache)."""
    root = os.environ.get("FEDADS_CACHE_DIR")
    return Path(root).expanduser() / "warm-start" if root else None


def _load_cached(folder: Path, key: str, model: PeftModel) -> tuple[Arrays, WarmStartInfo] | None:
    info_path = folder / INFO_FILE
    weights = folder / "adapter_model.safetensors"
    if not (info_path.is_file() and weights.is_file()):
        return None
    try:
        info = WarmStartInfo(**json.loads(info_path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as err:
        logger.warning("warm_start: ignoring %s, which cannot be read (%s)", info_path, err)
        return None
    if info.key != key:
        return None
    # PEFT stores the tensors without the adapter name; map them back to parameter names.
    saved = load_file(str(weights))
    arrays: Arrays = {}
    for name in get_adapter_arrays(model):
        stored = name.replace(".default.", ".").replace(".modules_to_save.", ".")
        if stored not in saved:
            logger.warning("warm_start: %s lacks %s, retraining", weights, stored)
            return None
        arrays[name] = saved[stored]
    return arrays, info


def _save(folder: Path, model: PeftModel, arrays: Arrays, info: WarmStartInfo) -> None:
    save_adapter(model, arrays, folder)
    write_json_atomic(folder / INFO_FILE, asdict(info))


def _train(cfg: RunConfig, model: PeftModel, records: list[AdRecord]) -> tuple[int, float]:
    # Imported here: client.train pulls in Opacus, which the server needs only for this.
    from client.train import steps_per_round, train_local
    from common.text import encode_records

    ws = cfg.warm_start
    tokenizer = load_tokenizer(cfg.model.name)
    examples = encode_records(tokenizer, records, max_length=cfg.model.max_length)
    steps = steps_per_round(len(examples), ws.batch_size, ws.epochs)
    train = TrainConfig(
        local_epochs=ws.epochs,
        batch_size=ws.batch_size,
        learning_rate=ws.learning_rate,
        optimizer="adamw",
    )
    result = train_local(
        model,
        examples,
        train=train,
        privacy=PrivacyConfig(dp=False),
        noise_multiplier=0.0,
        pad_token_id=int(tokenizer.pad_token_id or 0),
        seed=cfg.seed,
        steps=steps,
    )
    return result.steps, result.train_loss


def warm_start_adapter(
    cfg: RunConfig, model: PeftModel, run_dir: Path
) -> tuple[Arrays, WarmStartInfo] | None:
    """Return the warm-started adapter and its description, or None when it is off.

    The adapter is looked up in ``run_dir/warm_start`` (a resumed run), then in the shared
    cache (``FEDADS_CACHE_DIR``), and trained only when neither has one with the same
    :func:`warm_start_key`. The result is saved in PEFT format to ``run_dir/warm_start`` and
    to the shared cache. On entry ``model`` must contain the fresh adapter of ``cfg``; on
    return it contains the warm-started one.
    """
    if not cfg.warm_start.enabled:
        return None
    path = public_data_path(cfg)
    data_sha256 = file_sha256(path)
    key = warm_start_key(cfg, data_sha256)
    folders = [run_dir / WARM_START_DIR]
    shared = shared_cache_dir()
    if shared is not None:
        folders.append(shared / key)
    for folder in folders:
        cached = _load_cached(folder, key, model)
        if cached is not None:
            arrays, info = cached
            logger.info(
                "warm_start: using the adapter in %s (%s public records)", folder, info.num_records
            )
            set_adapter_arrays(model, arrays)
            if folder != folders[0]:
                _save(folders[0], model, arrays, info)
            return arrays, info

    records = load_public_records(cfg, path)
    if not records:
        raise ValueError(f"warm-start.file = {cfg.warm_start.file!r}: {path} contains no records")
    logger.warning(
        "warm_start: fine-tuning the initial adapter WITHOUT DP on %s public records from %s "
        "(epochs: %g); these records get no privacy protection",
        len(records),
        path,
        cfg.warm_start.epochs,
    )
    started = time.perf_counter()
    steps, loss = _train(cfg, model, records)
    arrays = get_adapter_arrays(model)
    ws = cfg.warm_start
    info = WarmStartInfo(
        file=str(path),
        sha256=data_sha256,
        num_records=len(records),
        epochs=ws.epochs,
        steps=steps,
        batch_size=ws.batch_size,
        learning_rate=ws.learning_rate,
        train_loss=loss,
        seconds=round(time.perf_counter() - started, 1),
        key=key,
    )
    logger.info("warm_start: %s steps in %.0fs, train loss %.3f", steps, info.seconds, loss)
    for folder in folders:
        _save(folder, model, arrays, info)
    return arrays, info


def describe(info: WarmStartInfo) -> dict[str, Any]:
    """Describe the warm start as ``privacy.json`` reports it."""
    return {
        "file": Path(info.file).name,
        "sha256": info.sha256,
        "num_records": info.num_records,
        "epochs": info.epochs,
        "steps": info.steps,
        "dp": False,
    }
