"""Ad records and strict loaders for JSON Lines and CSV files of (source, text) pairs."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
_COLUMN_FLAGS_HINT = (
    "Pass source_column= and text_column= (--source-column and --text-column on the "
    "command line) to name the columns that hold the source and the ad text"
)


class DataValidationError(ValueError):
    """Invalid input data, located by ``origin`` ("FILE:LINE", lines counted from 1).

    The message reads ``"FILE:LINE: problem. fix"`` so that editors and terminals can jump
    to the line. It never quotes the record content, because records are private data.
    """

    def __init__(self, problem: str, *, origin: str = "", fix: str = "") -> None:
        self.origin = origin
        self.problem = problem
        self.fix = fix
        message = f"{origin}: {problem}" if origin else problem
        if fix:
            message = f"{message}. {fix}"
        super().__init__(message)


def format_origin(path: str | Path, line: int) -> str:
    """Return the ``"FILE:LINE"`` location of a record (``line`` counted from 1)."""
    return f"{path}:{line}"


class RecordFields(Mapping[str, str]):
    """Read-only, hashable and picklable mapping of a record's column names to values."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, str] | None = None) -> None:
        self._data: dict[str, str] = dict(data or {})

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(tuple(self._data.items()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._data!r})"


@dataclass(frozen=True)
class AdRecord:
    """One training example: a source (product attributes or audience) and its ad text.

    Attributes
    ----------
    source : str
        Product attributes or audience/interest description that the ad is written for.
    text : str
        The ad text.
    fields : Mapping[str, str]
        Every raw column of the row, plus loader-specific parsed values (the E2E loader adds
        each meaning-representation attribute, e.g. ``fields["name"] == "The Eagle"``).
        Stored read-only.
    origin : str
        ``"FILE:LINE"`` of the row, for error messages. Log the origin, never the content.
    """

    source: str
    text: str
    fields: Mapping[str, str] = field(default_factory=RecordFields)
    origin: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.fields, RecordFields):
            object.__setattr__(self, "fields", RecordFields(self.fields))

    def __repr__(self) -> str:
        # Records are private advertiser data: a repr that ends up in a log or a traceback
        # shows where the record came from and its size, never its content.
        return (
            f"AdRecord(origin={self.origin!r}, source=<{len(self.source)} chars>, "
            f"text=<{len(self.text)} chars>, fields={sorted(self.fields)!r})"
        )


def read_text_strict(path: str | Path, encoding: str = "utf-8") -> str:
    """Read a whole text file, raising DataValidationError on bytes invalid in ``encoding``.

    A leading UTF-8 byte order mark is removed. The error for a bad byte gives the line that
    contains it and its byte offset in the file.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    DataValidationError
        If the file cannot be decoded, or is empty or contains only whitespace.
    ValueError
        If ``encoding`` is not a Python codec name.
    """
    path = Path(path)
    try:
        "".encode(encoding)
    except LookupError:
        raise ValueError(
            f"encoding={encoding!r} is not a known text encoding. Use a Python codec name "
            "such as 'utf-8' or 'latin-1'"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}. Check the path and try again")

    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataValidationError(
            f"invalid {encoding} byte 0x{raw[err.start]:02x} at byte offset {err.start} "
            f"({err.reason})",
            origin=format_origin(path, line),
            fix="Re-encode the file as UTF-8 (for example `iconv -f latin1 -t utf-8`) or pass "
            "the encoding it was written in",
        ) from None

    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise DataValidationError(
            "file is empty",
            origin=format_origin(path, 1),
            fix="Point the loader at a file with a header row (CSV) or one JSON object per "
            "line (JSON Lines)",
        )
    return text


def infer_format(path: str | Path, format: str | None = None) -> str:
    """Return ``format`` when given, else "jsonl" or "csv" from the file suffix."""
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"format={format!r} is not supported. Expected one of {FORMATS}")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise ValueError(
            f"cannot infer the data format of {path} from its suffix {suffix!r}. Rename it to "
            f"one of {sorted(_SUFFIX_FORMATS)} or pass format= (one of {FORMATS})"
        )
    return _SUFFIX_FORMATS[suffix]


def _json_value_to_str(value: object) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    # Numbers, booleans and nested values keep their JSON spelling ("1", "true", "[1, 2]").
    return json.dumps(value, ensure_ascii=False)


def _iter_jsonl_rows(text: str, path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    # Split on "\n" only: JSON strings cannot contain a raw newline, and editors count
    # lines the same way (str.splitlines would also split on U+2028 and form feeds).
    for line_number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        origin = format_origin(path, line_number)
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataValidationError(
                f"invalid JSON at column {err.colno}: {err.msg}",
                origin=origin,
                fix="Write one complete JSON object per line (JSON Lines), with no line "
                "breaks inside a record",
            ) from None
        if not isinstance(value, dict):
            raise DataValidationError(
                f"expected a JSON object, found a JSON {type(value).__name__}",
                origin=origin,
                fix="Write one JSON object per line (JSON Lines), not a JSON array or bare values",
            )
        yield line_number, {str(key): _json_value_to_str(item) for key, item in value.items()}


def _iter_csv_rows(
    text: str, path: Path, required_columns: Sequence[str], column_hint: str
) -> Iterator[tuple[int, dict[str, str]]]:
    # newline="" keeps quoted line breaks inside fields, as the csv module requires.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except csv.Error as err:
        raise DataValidationError(
            f"invalid CSV header: {err}", origin=format_origin(path, 1)
        ) from None
    header = [name.strip() for name in header]
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataValidationError(
            f"duplicate column names in the header: {', '.join(duplicates)}",
            origin=format_origin(path, 1),
            fix="Give every column a distinct name",
        )
    _check_columns(header, required_columns, format_origin(path, 1), column_hint)

    found_record = False
    while True:
        # reader.line_num counts the physical lines consumed so far, so the next record
        # starts on the line after it, even when the previous record spans several lines.
        start_line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataValidationError(
                f"invalid CSV: {err}",
                origin=format_origin(path, start_line),
                fix="Check the quoting of this record: a field that contains a comma, quote "
                'or line break must be enclosed in double quotes, with inner quotes doubled ("")',
            ) from None
        if not row:
            continue  # A blank line contains no record.
        if len(row) != len(header):
            raise DataValidationError(
                f"record has {len(row)} fields but the header has {len(header)} columns",
                origin=format_origin(path, start_line),
                fix="Enclose fields that contain commas in double quotes, or fix the "
                "number of fields",
            )
        found_record = True
        yield start_line, dict(zip(header, row))

    if not found_record:
        raise DataValidationError(
            "file has a header row but no records",
            origin=format_origin(path, 2),
            fix="Add records below the header, or point the loader at the right file",
        )


def _check_columns(
    columns: Sequence[str], required_columns: Sequence[str], origin: str, column_hint: str
) -> None:
    missing = [name for name in required_columns if name not in columns]
    if missing:
        found = ", ".join(repr(name) for name in columns) or "none"
        raise DataValidationError(
            f"missing column {', '.join(repr(name) for name in missing)} (columns found: {found})",
            origin=origin,
            fix=column_hint,
        )


def iter_rows(
    path: str | Path,
    *,
    format: str | None = None,
    encoding: str = "utf-8",
    required_columns: Sequence[str] = (),
    column_hint: str = "",
) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line, row)`` for every record of a JSON Lines or CSV file.

    ``line`` is the 1-based line where the record starts. Blank lines are skipped. Every
    row must contain ``required_columns``, and ``column_hint`` is the fix that the
    missing-column error suggests. JSON values that are not strings keep their JSON
    spelling, and ``null`` becomes "".

    Raises
    ------
    DataValidationError
        On bad encoding, an empty file, invalid JSON or CSV, or a missing column.
    """
    path = Path(path)
    format = infer_format(path, format)
    text = read_text_strict(path, encoding)
    if format == "csv":
        yield from _iter_csv_rows(text, path, required_columns, column_hint)
        return
    for line, row in _iter_jsonl_rows(text, path):
        _check_columns(list(row), required_columns, format_origin(path, line), column_hint)
        yield line, row


def record_from_row(
    row: Mapping[str, str],
    *,
    origin: str,
    source_column: str,
    text_column: str,
    max_chars: int | None,
    extra_fields: Mapping[str, str] | None = None,
) -> AdRecord:
    """Build an AdRecord from one row, rejecting an empty source or text or an over-long record.

    The length of a record is ``len(source) + len(text)`` in characters. ``max_chars=None``
    turns the length check off. ``extra_fields`` are added after the raw columns and must
    not reuse a column name.
    """
    source = row[source_column]
    text = row[text_column]
    for column, value in ((source_column, source), (text_column, text)):
        if not value.strip():
            raise DataValidationError(
                f"column {column!r} is empty",
                origin=origin,
                fix="Fill in the value or remove the record",
            )
    length = len(source) + len(text)
    if max_chars is not None and length > max_chars:
        raise DataValidationError(
            f"record is {length} characters long (source {len(source)} + text {len(text)}), "
            f"above max_chars={max_chars}",
            origin=origin,
            fix="Shorten the record or raise max_chars (--max-chars)",
        )

    fields = dict(row)
    for key, value in (extra_fields or {}).items():
        if key in fields:
            raise DataValidationError(
                f"parsed field {key!r} has the same name as a column of the file",
                origin=origin,
                fix=f"Rename the column {key!r}",
            )
        fields[key] = value
    return AdRecord(source=source, text=text, fields=fields, origin=origin)


def load_records(
    path: str | Path,
    *,
    source_column: str = "source",
    text_column: str = "text",
    format: str | None = None,
    max_chars: int | None = 2000,
    encoding: str = "utf-8",
) -> list[AdRecord]:
    """Load (source, text) records from a JSON Lines or CSV file, validating every record.

    Parameters
    ----------
    path : str or Path
        The data file. JSON Lines contains one object per line (blank lines are skipped). CSV
        starts with a header row.
    source_column, text_column : str
        Names of the columns with the source (product attributes or audience description)
        and the ad text. Defaults are "source" and "text". All other columns are kept in
        ``AdRecord.fields``.
    format : {"jsonl", "csv"}, optional
        File format. By default it follows the suffix: ``.jsonl`` and ``.json`` are
        JSON Lines, ``.csv`` is CSV.
    max_chars : int or None, default 2000
        Maximum of ``len(source) + len(text)`` per record. None disables the check.
    encoding : str, default "utf-8"
        Text encoding of the file.

    Returns
    -------
    list of AdRecord
        One record per row, in file order. No row is dropped silently: every invalid row
        raises.

    Raises
    ------
    DataValidationError
        With the file and line, for a missing column, an empty source or text, a record
        longer than ``max_chars``, invalid JSON or CSV, an invalid byte, or an empty file.
    """
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars={max_chars} must be a positive number of characters or None")
    path = Path(path)
    records = [
        record_from_row(
            row,
            origin=format_origin(path, line),
            source_column=source_column,
            text_column=text_column,
            max_chars=max_chars,
        )
        for line, row in iter_rows(
            path,
            format=format,
            encoding=encoding,
            required_columns=(source_column, text_column),
            column_hint=_COLUMN_FLAGS_HINT,
        )
    ]
    logger.info("load_records: loaded %s records from %s", len(records), path)
    return records
