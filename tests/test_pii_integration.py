"""PII scrubbing on the client's path from records to tokens (client.runtime)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from client.runtime import load_client_examples, pii_metrics
from common.config import RunConfig
from common.model import load_tokenizer

EMAIL = "jane.doe@example.com"
PHONE = "(555) 123-4567"
CARD = "4111 1111 1111 1111"  # a Luhn-valid test card number
URL = "https://shop.example.com/track?uid=98765"
RECORDS = [
    {"source": f"contact[{EMAIL}], product[running shoes]",
     "text": f"Fast shoes for your next race. Questions? Mail {EMAIL}."},
    {"source": "product[coffee], city[Leeds]", "text": f"Order by phone on {PHONE} today."},
    {"source": "product[gift card]", "text": f"Paid with card {CARD}, thanks!"},
    {"source": "product[tent]", "text": f"Track your order at {URL} anytime."},
    {"source": "product[socks]", "text": "Warm wool socks for winter walks."},
]  # fmt: skip
# Values whose tokens must be gone after scrubbing, as they appear once tokenized.
SECRETS = {
    "email": ["jane", "doe"],
    "phone": ["555", "123", "4567"],
    "card": ["4111"],
    "url": ["98765", "uid"],
}


@pytest.fixture(scope="module")
def records_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("advertiser") / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm-l6")


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def _decoded(cfg: RunConfig, context: Context, tokenizer) -> str:
    examples, pad = load_client_examples(cfg, context)
    assert pad == tokenizer.pad_token_id
    return " ".join(tokenizer.decode(example.input_ids) for example in examples)


def _config(records_file: Path, **privacy) -> RunConfig:
    return RunConfig().replace(
        data={"dataset": "records", "train_file": str(records_file)},
        privacy={key.replace("-", "_"): value for key, value in privacy.items()},
    )


def test_default_scrubbing_removes_every_kind(records_file, tokenizer):
    cfg = _config(records_file)
    text = _decoded(cfg, _context({"data-path": str(records_file), "client-id": "a"}), tokenizer)
    for kind, pieces in SECRETS.items():
        for piece in pieces:
            assert piece not in text, f"{kind}: {piece!r} survived scrubbing"
    for label in ("[ email ]", "[ phone ]", "[ card ]", "[ url ]"):
        assert label in text
    assert "warm wool socks for winter walks" in text  # records without PII are unchanged


def test_scrubbing_off_keeps_values(records_file, tokenizer, caplog):
    cfg = _config(records_file, scrub_pii=False)
    with caplog.at_level(logging.WARNING, logger="client.runtime"):
        text = _decoded(cfg, _context({"data-path": str(records_file)}), tokenizer)
    for pieces in SECRETS.values():
        for piece in pieces:
            assert piece in text
    assert "privacy.scrub-pii is off" in caplog.text


def test_scrub_kinds_select_detectors(records_file, tokenizer):
    cfg = _config(records_file, scrub_kinds="email,card")
    text = _decoded(cfg, _context({"data-path": str(records_file)}), tokenizer)
    assert "jane" not in text
    assert "4111" not in text
    assert "4567" in text  # phones were not selected
    assert "98765" in text  # nor URLs


def test_counts_stay_on_client_by_default(records_file):
    cfg = _config(records_file)
    context = _context({"data-path": str(records_file)})
    assert pii_metrics(cfg, context) == {}

    reporting = _config(records_file, report_pii_counts=True)
    # Two emails in the first record's source and text, one of each other kind.
    assert pii_metrics(reporting, context) == {"pii-replaced": 5}


def test_scrub_log_has_counts_not_values(tmp_path, caplog):
    # A file of its own, because each process scrubs and logs a file once.
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    with caplog.at_level(logging.INFO):
        load_client_examples(_config(path), _context({"data-path": str(path)}))
    assert "changed 4 of 5 records" in caplog.text
    assert "2 email" in caplog.text
    for pieces in SECRETS.values():
        for piece in pieces:
            assert piece not in caplog.text


def test_simulation_partition_is_scrubbed(tmp_path, tokenizer):
    # The partition path (a simulated node with partition-id) scrubs the same way.
    rows = [
        {"source": f"product[item {i}]", "text": f"Item {i} ships today. Call {PHONE}."}
        for i in range(30)
    ]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = RunConfig().replace(
        data={"dataset": "records", "train_file": str(path), "partitioner": "iid",
              "num_clients": 2},
    )  # fmt: skip
    for partition_id in (0, 1):
        text = _decoded(cfg, _context({"partition-id": partition_id}), tokenizer)
        assert "[ phone ]" in text
        assert "4567" not in text
