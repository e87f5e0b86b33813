"""Load a finished run's global adapter and score it on a test file."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from common.config import RunConfig
from common.data import AdRecord, DataValidationError, load_records
from common.e2e import load_e2e, parse_mr
from common.generation import generate_texts
from common.metrics import corpus_bleu, rouge_l, slot_error_rate
from common.model import load_base_model, load_tokenizer

logger = logging.getLogger(__name__)


def load_run_model(run_dir: str | Path) -> tuple[PeftModel, PreTrainedTokenizerBase, RunConfig]:
    """Base model of the run with ``global_adapter/`` loaded by ``PeftModel.from_pretrained``."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.toml"
    adapter_dir = run_dir / "global_adapter"
    if not config_path.is_file() or not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a finished run folder (expected config.toml and "
            "global_adapter/adapter_config.json): pass the folder printed by fedads simulate"
        )
    cfg = RunConfig.from_toml(config_path)
    base = load_base_model(cfg.model.name)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model, load_tokenizer(cfg.model.name), cfg


def _csv_header(path: Path) -> list[str]:
    with path.open(encoding="utf-8", newline="") as handle:
        return next(csv.reader(handle), [])


def load_test_records(path: str | Path) -> list[AdRecord]:
    """Read an E2E CSV (``mr,ref``) or a ``source,text`` CSV/JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"test file not found: {path}")
    if path.suffix == ".csv" and {"mr", "ref"} <= set(_csv_header(path)):
        return load_e2e(path, max_chars=None)
    return load_records(path, max_chars=None)


def _slot_fields(source: str) -> dict[str, str] | None:
    try:
        fields = parse_mr(source)
    except DataValidationError:
        return None
    return fields or None


def evaluate_run(
    run_dir: str | Path, test_file: str | Path, *, limit: int | None = None
) -> dict[str, Any]:
    """Generate one text per distinct source of ``test_file`` and score it.

    Scores are multi-reference corpus BLEU and ROUGE-L (lowercased, 0-100) and, when every
    source is an E2E meaning representation, the slot error rate. Writes ``eval.json``.
    """
    run_dir = Path(run_dir)
    model, tokenizer, cfg = load_run_model(run_dir)
    groups: dict[str, list[str]] = {}
    for record in load_test_records(test_file):
        groups.setdefault(record.source, []).append(record.text)
    sources = list(groups)[:limit] if limit else list(groups)
    references = [groups[source] for source in sources]
    hypotheses = [
        texts[0]
        for texts in generate_texts(
            model,
            tokenizer,
            sources,
            max_new_tokens=cfg.model.max_new_tokens,
            show_progress=True,
        )
    ]
    fields = [_slot_fields(source) for source in sources]
    ser = None
    if all(f is not None for f in fields):
        ser = slot_error_rate([f for f in fields if f is not None], hypotheses)
    result = {
        "bleu": corpus_bleu(hypotheses, references),
        "rouge_l": rouge_l(hypotheses, references),
        "slot_error_rate": ser,
        "num_sources": len(sources),
        "test_file": str(test_file),
        "bleu_settings": "sacrebleu corpus BLEU, 13a tokenizer, lowercased, multi-reference",
    }
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result
