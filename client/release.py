"""The client's last released update, kept so that a rerun round re-sends it unchanged.

When the server crashes after a client has trained round ``t`` but before the server
finished that round, the resumed server sends round ``t`` again, with the same global
adapter. Training again would release a second noisy update of the same records, and
the ledger would rightly count a second event. Re-sending the update already released
is post-processing of a released value, so it costs no privacy: the client stores each
released update next to its ledger, with a digest of the message it replied to, and
re-sends it when the same round arrives with the same digest. Under secure aggregation
the client declines such a rerun instead (:mod:`client.secagg`): the same update in two
sessions with different survivors would give the server two sums to subtract.

The update is stored only after its privacy event is in the ledger, so a stored update
is always counted. The one window that is not covered is a crash between the two writes:
the round is then trained again and counted twice, which over-counts ε and never
under-counts it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Message

from common.adapter import Arrays
from common.atomic import write_bytes_atomic


@dataclass(frozen=True)
class Release:
    """One released update: the round, the digest of the request, tensors and metrics."""

    server_round: int
    request_digest: str
    arrays: Arrays
    metrics: dict[str, float | int]


def release_path(ledger_path: Path) -> Path:
    """File of the last release, beside the ledger ``<client>.json``."""
    return ledger_path.with_name(f"{ledger_path.stem}.release.npz")


def request_digest(msg: Message) -> str:
    """SHA-256 of a train message's tensors (names, dtypes, shapes, bytes) and config."""
    digest = hashlib.sha256()
    for name, array in sorted(msg.content.array_records["arrays"].items()):
        digest.update(f"{name}|{array.dtype}|{tuple(array.shape)}|".encode())
        digest.update(array.data)
    config = dict(msg.content.config_records["config"])
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def save_release(path: Path, release: Release) -> None:
    """Write ``release`` atomically (temporary file, fsync, rename)."""
    meta = {
        "server_round": release.server_round,
        "request_digest": release.request_digest,
        "metrics": release.metrics,
    }
    arrays = {f"adapter/{name}": value for name, value in release.arrays.items()}
    arrays["meta"] = np.array(json.dumps(meta))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    write_bytes_atomic(path, buffer.getvalue())


def load_release(path: Path) -> Release | None:
    """Read the last release, or return None when there is none or it is unreadable.

    An unreadable file only means the round is trained (and counted) again.
    """
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta: Mapping = json.loads(str(npz["meta"]))
            arrays = {key[8:]: npz[key] for key in npz.files if key.startswith("adapter/")}
    except (OSError, ValueError, KeyError):
        return None
    return Release(
        server_round=int(meta["server_round"]),
        request_digest=str(meta["request_digest"]),
        arrays=arrays,
        metrics=dict(meta["metrics"]),
    )
