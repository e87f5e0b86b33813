"""E2E NLG restaurant dataset: meaning-representation parsing, verified download and loading."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common.data import (
    AdRecord,
    DataValidationError,
    format_origin,
    iter_rows,
    record_from_row,
)

logger = logging.getLogger(__name__)

MR_COLUMN = "mr"
REF_COLUMN = "ref"
_CHUNK_BYTES = 1 << 16
# A standalone "@" with the space before it, e.g. "cheap @ Indian" -> "cheap Indian".
_EDIT_MARKER = re.compile(r"\s+@(?=\s|$)")


@dataclass(frozen=True)
class E2EFile:
    """A known E2E file: its name, where to download it and its SHA-256 digest.

    ``url`` and ``sha256`` are None for a derived file that has no public download, and
    ``how_to_obtain`` then describes how to build it.
    """

    name: str
    description: str
    url: str | None = None
    sha256: str | None = None
    how_to_obtain: str = ""


E2E_FILES: dict[str, E2EFile] = {
    "devset.csv": E2EFile(
        name="devset.csv",
        description="E2E NLG Challenge development set: 4,672 (mr, ref) pairs, 547 MRs "
        "(CC BY-SA 4.0, github.com/tuetschek/e2e-dataset)",
        url="https://raw.githubusercontent.com/tuetschek/e2e-dataset/master/devset.csv",
        # NOTE: this digest was computed from a local copy of the upstream devset.csv. It was
        # not checked against a fresh download, so a changed upstream file fails the check.
        sha256="fc26b78cdb849c80545f513b223d1e051138b43882eeb79e3eb153e689c864f9",
    ),
    "trainset_subset.csv": E2EFile(
        name="trainset_subset.csv",
        description="subset of the E2E training set (MRs with 3 or 8 attributes), "
        "3,365 (mr, ref) pairs (CC BY-SA 4.0)",
        how_to_obtain="It has no public download: convert train/3attributes.xml and "
        "train/8attributes.xml of github.com/ThiagoCF05/EnrichedE2E into a CSV file with "
        "the columns mr,ref",
    ),
}


def parse_mr(mr: str, *, origin: str = "") -> dict[str, str]:
    """Parse an E2E meaning representation into an ordered attribute dict.

    ``"name[The Eagle], eatType[coffee shop]"`` becomes
    ``{"name": "The Eagle", "eatType": "coffee shop"}``. Whitespace around keys and values
    is removed, and an empty value (``food[]``) is kept as "".

    Raises
    ------
    DataValidationError
        If the MR is empty, a bracket is unbalanced or nested, a key is empty or repeated,
        or text other than a comma follows a closing bracket. Positions in the message
        count characters of the MR from 1, and ``origin`` locates the row.
    """
    fix = "Write the MR as comma-separated key[value] pairs, e.g. name[The Eagle], food[French]"

    def fail(problem: str) -> DataValidationError:
        return DataValidationError(f"malformed MR: {problem}", origin=origin, fix=fix)

    if not mr.strip():
        raise fail("the MR is empty")

    attributes: dict[str, str] = {}
    position = 0
    while position < len(mr):
        open_bracket = mr.find("[", position)
        close_bracket = mr.find("]", position)
        if open_bracket == -1:
            raise fail(f"expected key[value] at character {position + 1}, found no '['")
        if close_bracket != -1 and close_bracket < open_bracket:
            raise fail(f"']' at character {close_bracket + 1} has no matching '['")
        if close_bracket == -1:
            raise fail(f"'[' at character {open_bracket + 1} has no matching ']'")
        nested = mr.find("[", open_bracket + 1, close_bracket)
        if nested != -1:
            raise fail(f"'[' at character {nested + 1} is nested inside another '[...]'")

        key = mr[position:open_bracket].strip()
        if not key:
            raise fail(f"empty key before '[' at character {open_bracket + 1}")
        if "]" in key or "," in key:
            raise fail(f"key ending at character {open_bracket} contains ',' or ']'")
        if key in attributes:
            raise fail(f"key {key!r} appears twice")
        attributes[key] = mr[open_bracket + 1 : close_bracket].strip()

        # After "]" only whitespace, then either the end or a comma and the next pair.
        position = close_bracket + 1
        while position < len(mr) and mr[position].isspace():
            position += 1
        if position == len(mr):
            break
        if mr[position] != ",":
            raise fail(f"expected ',' or the end of the MR at character {position + 1}")
        position += 1
        if not mr[position:].strip():
            raise fail(f"trailing ',' at character {position}")
    return attributes


def _e2e_file_info(name: str) -> E2EFile:
    if name not in E2E_FILES:
        raise ValueError(
            f"name={name!r} is not a known E2E file. Expected one of {sorted(E2E_FILES)}, "
            "or pass url= and sha256= to download another file"
        )
    return E2E_FILES[name]


def ensure_e2e_file(
    data_dir: str | Path,
    name: str = "devset.csv",
    *,
    download: bool = True,
    timeout: float = 30,
    url: str | None = None,
    sha256: str | None = None,
) -> Path:
    """Return the path of an E2E file, downloading and verifying it when it is missing.

    The file is looked for at ``data_dir/e2e/NAME``, then at ``data_dir/NAME``. A file that
    is found is returned as it is, without checking its digest. A missing file with a known
    URL is downloaded into ``data_dir/e2e/``. The download goes to a temporary file in
    that folder, its SHA-256 digest is checked, and only then is it renamed to ``NAME``,
    so an interrupted or corrupted download never leaves a partial file under that name.

    Parameters
    ----------
    data_dir : str or Path
        Data folder (the one that contains ``e2e/``).
    name : str, default "devset.csv"
        File name, a key of ``E2E_FILES`` unless ``url`` is given.
    download : bool, default True
        Whether to download a missing file. With False a missing file raises.
    timeout : float, default 30
        Seconds to wait for the server before giving up.
    url, sha256 : str, optional
        Override the download URL and the expected hex SHA-256 digest of ``NAME`` (for a
        mirror). Without ``sha256`` an overridden URL is checked against the known digest.

    Raises
    ------
    FileNotFoundError
        If the file is missing and cannot be downloaded (no URL, ``download=False``, no
        network, HTTP error or timeout). The message names where it was looked for, the URL
        and the folder to put it in.
    ValueError
        If the downloaded file does not match the expected SHA-256 digest. The partial
        download is deleted.
    """
    data_dir = Path(data_dir)
    candidates = [data_dir / "e2e" / name, data_dir / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate

    info = E2E_FILES.get(name) if url is not None else _e2e_file_info(name)
    if url is None and info is not None:
        url = info.url
    if sha256 is None and info is not None:
        sha256 = info.sha256

    target_dir = data_dir / "e2e"
    looked_in = " and ".join(str(candidate) for candidate in candidates)
    if url is None:
        how_to_obtain = f" {info.how_to_obtain}." if info and info.how_to_obtain else ""
        raise FileNotFoundError(
            f"E2E file {name} not found (looked for {looked_in}).{how_to_obtain} Put the file "
            f"in {target_dir}/ or point the data directory at a folder that contains e2e/{name}"
        )
    if not download:
        raise FileNotFoundError(
            f"E2E file {name} not found (looked for {looked_in}) and downloading is turned "
            f"off. Download it from {url} and put it in {target_dir}/, or allow downloads"
        )
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise ValueError(f"url={url!r} is not an http(s) URL")
    if sha256 is None:
        raise ValueError(
            f"no SHA-256 digest is known for {name}: pass sha256= so that the download from "
            f"{url} can be verified"
        )

    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / name
    _download_verified(url, target, sha256=sha256.lower(), timeout=timeout, looked_in=looked_in)
    return target


def _download_verified(
    url: str, target: Path, *, sha256: str, timeout: float, looked_in: str
) -> None:
    logger.info("ensure_e2e_file: downloading %s to %s", url, target)
    handle, temp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".part", dir=target.parent
    )
    temp_path = Path(temp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(handle, "wb") as temp_file:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    while chunk := response.read(_CHUNK_BYTES):
                        digest.update(chunk)
                        temp_file.write(chunk)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                # HTTPError's reason lacks the status code, so use its full message.
                is_http_error = isinstance(err, urllib.error.HTTPError)
                reason = err if is_http_error else getattr(err, "reason", err)
                raise FileNotFoundError(
                    f"E2E file {target.name} not found (looked for {looked_in}) and the "
                    f"download from {url} failed: {reason}. Without network access, fetch "
                    f"{url} on another machine and put the file in {target.parent}/"
                ) from err

        actual = digest.hexdigest()
        if actual != sha256:
            raise ValueError(
                f"SHA-256 mismatch for {url}: expected {sha256}, got {actual}. The download "
                "was deleted. The upstream file may have changed or the transfer was corrupted: "
                "retry, or check the file and pass its digest as sha256="
            )
        os.replace(temp_path, target)
        logger.info("ensure_e2e_file: verified SHA-256 of %s", target)
    finally:
        temp_path.unlink(missing_ok=True)


def load_e2e(path: str | Path, *, max_chars: int | None = 2000) -> list[AdRecord]:
    """Load an E2E CSV file (columns ``mr`` and ``ref``) as AdRecords.

    ``source`` is the MR and ``text`` the reference, without the standalone ``@`` tokens
    that mark edited spots in EnrichedE2E's references (the official devset.csv has no ``@``).
    ``fields`` contains the raw columns
    (``mr``, ``ref`` and any others) and each parsed MR attribute, so that
    ``fields["name"]`` is the venue. Validation is the same as in ``load_records``, and a
    malformed MR raises DataValidationError with its file and line.
    """
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars={max_chars} must be a positive number of characters or None")
    path = Path(path)
    records = []
    rows = iter_rows(
        path,
        format="csv",
        required_columns=(MR_COLUMN, REF_COLUMN),
        column_hint=f"An E2E file needs the columns {MR_COLUMN!r} and {REF_COLUMN!r}, as in "
        "the upstream devset.csv. Use load_records for other column names",
    )
    for line, row in rows:
        origin = format_origin(path, line)
        attributes = parse_mr(row[MR_COLUMN], origin=origin)
        row = {**row, REF_COLUMN: _EDIT_MARKER.sub("", row[REF_COLUMN])}
        records.append(
            record_from_row(
                row,
                origin=origin,
                source_column=MR_COLUMN,
                text_column=REF_COLUMN,
                max_chars=max_chars,
                extra_fields=attributes,
            )
        )
    logger.info("load_e2e: loaded %s records from %s", len(records), path)
    return records
