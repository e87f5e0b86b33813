"""Tests for the record loaders, E2E parsing and the verified E2E download."""

from __future__ import annotations

import hashlib
import http.server
import pickle
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.data import AdRecord, DataValidationError, load_records, read_text_strict
from common.e2e import E2E_FILES, ensure_e2e_file, load_e2e, parse_mr

# --- real data ------------------------------------------------------------------------------


def test_e2e_devset_counts(data_dir: Path) -> None:
    path = ensure_e2e_file(data_dir, "devset.csv", download=False)
    records = load_e2e(path)

    assert len(records) == 4672
    assert len({record.source for record in records}) == 547
    assert len({record.fields["name"] for record in records}) == 20


def test_e2e_devset_first_record(data_dir: Path) -> None:
    path = data_dir / "e2e" / "devset.csv"
    first = load_e2e(path)[0]

    assert first.source == "name[Alimentum], area[city centre], familyFriendly[no]"
    assert first.text.startswith("There is a place in the city centre, Alimentum")
    assert first.origin == f"{path}:2"
    assert dict(first.fields) == {
        "mr": first.source,
        "ref": first.text,
        "name": "Alimentum",
        "area": "city centre",
        "familyFriendly": "no",
    }


def test_e2e_devset_checksum_matches_known_digest(data_dir: Path) -> None:
    digest = hashlib.sha256((data_dir / "e2e" / "devset.csv").read_bytes()).hexdigest()

    assert digest == E2E_FILES["devset.csv"].sha256


def test_e2e_trainset_subset_counts(data_dir: Path) -> None:
    records = load_e2e(ensure_e2e_file(data_dir, "trainset_subset.csv", download=False))

    assert len(records) == 3365
    assert len({record.source for record in records}) == 363
    # 929 references carry EnrichedE2E's "@" edit marker, which the loader drops.
    assert not any("@" in record.text for record in records)
    assert "The Punter offers cheap Indian food." in {record.text for record in records}


def test_e2e_drops_standalone_at_tokens_only(tmp_path: Path) -> None:
    path = tmp_path / "e2e.csv"
    path.write_text(
        "mr,ref\n"
        "name[A],A offers cheap @ Indian food @\n"
        "name[B],Write to b@example.com at B.\n",
        encoding="utf-8",
    )

    texts = [record.text for record in load_e2e(path)]

    assert texts == ["A offers cheap Indian food", "Write to b@example.com at B."]
    assert load_e2e(path)[0].fields["ref"] == "A offers cheap Indian food"


def test_load_records_adgen_jsonl(data_dir: Path) -> None:
    records = load_records(
        data_dir / "adgen" / "dev.json", source_column="content", text_column="summary"
    )

    assert len(records) == 1070
    assert records[0].source.startswith("类型#上衣")
    assert records[0].origin.endswith("dev.json:1")
    assert records[-1].origin.endswith("dev.json:1070")


# --- records and generic loading ------------------------------------------------------------


def test_record_repr_hides_content() -> None:
    record = AdRecord(source="secret audience", text="secret ad", origin="ads.csv:7")

    assert "secret" not in repr(record)
    assert "ads.csv:7" in repr(record)


def test_record_fields_read_only_and_picklable() -> None:
    record = AdRecord(source="s", text="t", fields={"name": "The Eagle"}, origin="a:2")

    with pytest.raises(TypeError):
        record.fields["name"] = "other"  # type: ignore[index]
    assert pickle.loads(pickle.dumps(record)) == record
    assert hash(record) == hash(
        AdRecord(source="s", text="t", fields={"name": "The Eagle"}, origin="a:2")
    )


def test_load_records_csv_multiline_origin(tmp_path: Path) -> None:
    path = tmp_path / "ads.csv"
    path.write_text(
        'source,text,segment\nrunners,"Fast shoes.\nBuy now.",sport\ncooks,Sharp knives.,home\n',
        encoding="utf-8",
    )

    records = load_records(path)

    assert [record.origin for record in records] == [f"{path}:2", f"{path}:4"]
    assert records[0].text == "Fast shoes.\nBuy now."
    assert records[1].fields["segment"] == "home"


def test_load_records_csv_blank_line_skipped(tmp_path: Path) -> None:
    path = tmp_path / "ads.csv"
    path.write_text("source,text\na,b\n\nc,d\n", encoding="utf-8")

    records = load_records(path)

    assert [record.origin for record in records] == [f"{path}:2", f"{path}:4"]


def test_load_records_jsonl_blank_lines_and_values(tmp_path: Path) -> None:
    path = tmp_path / "ads.jsonl"
    path.write_text(
        '{"source": "a", "text": "x", "bid": 1.5, "active": true, "note": null}\n\n'
        '{"source": "b", "text": "y", "bid": 2, "active": false, "note": "n"}\n',
        encoding="utf-8",
    )

    records = load_records(path)

    assert [record.origin for record in records] == [f"{path}:1", f"{path}:3"]
    assert dict(records[0].fields) == {
        "source": "a",
        "text": "x",
        "bid": "1.5",
        "active": "true",
        "note": "",
    }


def test_load_records_strips_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "ads.csv"
    path.write_bytes("source,text\na,b\n".encode("utf-8-sig"))

    records = load_records(path)

    assert records[0].fields["source"] == "a"


def test_load_records_explicit_format(tmp_path: Path) -> None:
    path = tmp_path / "ads.txt"
    path.write_text("source,text\na,b\n", encoding="utf-8")

    with pytest.raises(ValueError, match="suffix"):
        load_records(path)
    assert load_records(path, format="csv")[0].text == "b"


def test_load_records_latin1_encoding(tmp_path: Path) -> None:
    path = tmp_path / "ads.csv"
    path.write_bytes("source,text\ncafé,crème\n".encode("latin-1"))

    records = load_records(path, encoding="latin-1")

    assert records[0].text == "crème"


# --- malformed inputs -----------------------------------------------------------------------


def test_missing_column_csv(tmp_path: Path) -> None:
    path = tmp_path / "ads.csv"
    path.write_text("audience,copy\na,b\n", encoding="utf-8")

    with pytest.raises(DataValidationError) as info:
        load_records(path)

    message = str(info.value)
    assert f"{path}:1:" in message
    assert "missing column 'source', 'text'" in message
    assert "'audience', 'copy'" in message
    assert "--source-column" in message


def test_missing_key_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "ads.jsonl"
    path.write_text(
        '{"source": "a", "text": "x"}\n{"source": "b", "text": "y"}\n{"source": "c"}\n',
        encoding="utf-8",
    )

    with pytest.raises(DataValidationError) as info:
        load_records(path)

    assert f"{path}:3:" in str(info.value)
    assert "missing column 'text'" in str(info.value)
    assert "--text-column" in str(info.value)


@pytest.mark.parametrize("column", ["source", "text"])
def test_empty_value_rejected(tmp_path: Path, column: str) -> None:
    path = tmp_path / "ads.csv"
    row = {"source": "a", "text": "b", column: "  "}
    path.write_text(f"source,text\nx,y\n{row['source']},{row['text']}\n", encoding="utf-8")

    with pytest.raises(DataValidationError) as info:
        load_records(path)

    assert f"{path}:3:" in str(info.value)
    assert f"column {column!r} is empty" in str(info.value)


def test_over_long_record(tmp_path: Path) -> None:
    path = tmp_path / "ads.jsonl"
    path.write_text(
        '{"source": "a", "text": "short"}\n' + '{"source": "abc", "text": "' + "x" * 60 + '"}\n',
        encoding="utf-8",
    )

    with pytest.raises(DataValidationError) as info:
        load_records(path, max_chars=50)

    message = str(info.value)
    assert f"{path}:2:" in message
    assert "63 characters" in message
    assert "max_chars=50" in message
    assert len(load_records(path, max_chars=None)) == 2


def test_invalid_json_line(tmp_path: Path) -> None:
    path = tmp_path / "ads.jsonl"
    path.write_text('{"source": "a", "text": "x"}\n{"source": "b", "text": "y"\n', encoding="utf-8")

    with pytest.raises(DataValidationError) as info:
        load_records(path)

    assert f"{path}:2:" in str(info.value)
    assert "invalid JSON" in str(info.value)


def test_json_array_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ads.json"
    path.write_text('[{"source": "a", "text": "x"}]\n', encoding="utf-8")

    with pytest.raises(DataValidationError) as info:
        load_records(path)

    assert f"{path}:1:" in str(info.value)
    assert "JSON list" in str(info.value)


def test_bad_encoding_names_line(tmp_path: Path) -> None:
    path = tmp_path / "ads.csv"
    content = b"source,text\nrunners,Fast shoes\ncooks,Sharp kni\xffves\n"
    path.write_bytes(content)
    bad_byte_offset = content.index(b"\xff")

    with pytest.raises(DataValidationError) as info:
        load_records(path)

    message = str(info.value)
    assert f"{path}:3:" in message
    assert f"byte offset {bad_byte_offset}" in message
    assert "0xff" in message
    assert "UTF-8" in message


@pytest.mark.parametrize("content", [b"", b"  \n\n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ads.jsonl"
    path.write_bytes(content)

    with pytest.raises(DataValidationError) as info:
        read_text_strict(path)

    assert f"{path}:1:" in str(info.value)
    assert "empty" in str(info.value)


def test_header_without_records(tmp_path: Path) -> None:
    path = tmp_path / "ads.csv"
    path.write_text("source,text\n", encoding="utf-8")

    with pytest.raises(DataValidationError) as info:
        load_records(path)

    assert f"{path}:2:" in str(info.value)
    assert "no records" in str(info.value)


def test_csv_wrong_field_count(tmp_path: Path) -> None:
    path = tmp_path / "ads.csv"
    path.write_text("source,text\na,b\nc,d,e\n", encoding="utf-8")

    with pytest.raises(DataValidationError) as info:
        load_records(path)

    assert f"{path}:3:" in str(info.value)
    assert "3 fields" in str(info.value)


def test_csv_unclosed_quote(tmp_path: Path) -> None:
    path = tmp_path / "ads.csv"
    path.write_text('source,text\na,b\nc,"d\n', encoding="utf-8")

    with pytest.raises(DataValidationError) as info:
        load_records(path)

    assert f"{path}:3:" in str(info.value)
    assert "invalid CSV" in str(info.value)


def test_missing_file_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_records(tmp_path / "absent.csv")


def test_e2e_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "e2e.csv"
    path.write_text("meaning,ref\nname[A],An A.\n", encoding="utf-8")

    with pytest.raises(DataValidationError) as info:
        load_e2e(path)

    assert f"{path}:1:" in str(info.value)
    assert "missing column 'mr'" in str(info.value)
    assert "'meaning', 'ref'" in str(info.value)


def test_e2e_malformed_mr_names_line(tmp_path: Path) -> None:
    path = tmp_path / "e2e.csv"
    path.write_text(
        'mr,ref\n"name[A], food[French]",A serves French food.\n'
        '"name[B], food[Italian",B serves Italian food.\n',
        encoding="utf-8",
    )

    with pytest.raises(DataValidationError) as info:
        load_e2e(path)

    assert f"{path}:3:" in str(info.value)
    assert "malformed MR" in str(info.value)
    assert "Italian" not in str(info.value)


# --- MR parsing -----------------------------------------------------------------------------


def test_parse_mr_ordered() -> None:
    attributes = parse_mr("name[The Eagle], eatType[coffee shop], food[French], near[]")

    assert list(attributes.items()) == [
        ("name", "The Eagle"),
        ("eatType", "coffee shop"),
        ("food", "French"),
        ("near", ""),
    ]


@pytest.mark.parametrize(
    ("mr", "problem"),
    [
        ("", "empty"),
        ("name[The Eagle", "no matching ']'"),
        ("name]The Eagle[", "no matching '['"),
        ("[The Eagle]", "empty key"),
        ("name[The Eagle], [French]", "empty key"),
        ("name[The [Eagle]]", "nested"),
        ("name[A], name[B]", "appears twice"),
        ("name[A] food[B]", "expected ','"),
        ("name[A],", "trailing ','"),
        ("name[A], food", "no '['"),
    ],
)
def test_parse_mr_malformed(mr: str, problem: str) -> None:
    with pytest.raises(DataValidationError) as info:
        parse_mr(mr, origin="dev.csv:9")

    assert str(info.value).startswith("dev.csv:9: malformed MR")
    assert problem in str(info.value)


# --- download -------------------------------------------------------------------------------

PAYLOAD = b'mr,ref\n"name[A], food[French]",A serves French food.\n'
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib honours proxy variables, which would send requests for 127.0.0.1 elsewhere.
    for name in (
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")


@pytest.fixture()
def local_server() -> Iterator[str]:
    """Serve ``/devset.csv`` with PAYLOAD on 127.0.0.1 and yield the base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/devset.csv":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_download_success(tmp_path: Path, local_server: str) -> None:
    path = ensure_e2e_file(
        tmp_path, "devset.csv", url=f"{local_server}/devset.csv", sha256=PAYLOAD_SHA256
    )

    assert path == tmp_path / "e2e" / "devset.csv"
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in (tmp_path / "e2e").iterdir()) == ["devset.csv"]
    assert load_e2e(path)[0].fields["food"] == "French"


def test_download_checksum_mismatch(tmp_path: Path, local_server: str) -> None:
    with pytest.raises(ValueError, match="SHA-256 mismatch") as info:
        ensure_e2e_file(tmp_path, "devset.csv", url=f"{local_server}/devset.csv", sha256="0" * 64)

    assert PAYLOAD_SHA256 in str(info.value)
    assert list((tmp_path / "e2e").iterdir()) == []


def test_download_default_digest_rejects_other_file(tmp_path: Path, local_server: str) -> None:
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        ensure_e2e_file(tmp_path, "devset.csv", url=f"{local_server}/devset.csv")

    assert list((tmp_path / "e2e").iterdir()) == []


def test_download_connection_refused(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/devset.csv"

    with pytest.raises(FileNotFoundError) as info:
        ensure_e2e_file(tmp_path, "devset.csv", url=url, sha256=PAYLOAD_SHA256, timeout=5)

    message = str(info.value)
    assert "devset.csv not found" in message
    assert str(tmp_path / "e2e" / "devset.csv") in message
    assert str(tmp_path / "devset.csv") in message
    assert url in message
    assert f"put the file in {tmp_path / 'e2e'}/" in message
    assert list((tmp_path / "e2e").iterdir()) == []


def test_download_http_error(tmp_path: Path, local_server: str) -> None:
    url = f"{local_server}/missing.csv"

    with pytest.raises(FileNotFoundError) as info:
        ensure_e2e_file(tmp_path, "devset.csv", url=url, sha256=PAYLOAD_SHA256)

    assert "404" in str(info.value)
    assert list((tmp_path / "e2e").iterdir()) == []


def test_existing_file_found_without_download(tmp_path: Path) -> None:
    (tmp_path / "devset.csv").write_bytes(PAYLOAD)

    path = ensure_e2e_file(tmp_path, "devset.csv", download=False)

    assert path == tmp_path / "devset.csv"


def test_download_disabled_names_url(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        ensure_e2e_file(tmp_path, "devset.csv", download=False)

    url = E2E_FILES["devset.csv"].url
    assert url is not None
    assert url in str(info.value)
    assert str(tmp_path / "e2e") in str(info.value)


def test_derived_file_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        ensure_e2e_file(tmp_path, "trainset_subset.csv")

    assert "EnrichedE2E" in str(info.value)
    assert f"Put the file in {tmp_path / 'e2e'}/" in str(info.value)


def test_unknown_e2e_file_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a known E2E file"):
        ensure_e2e_file(tmp_path, "testset.csv")
