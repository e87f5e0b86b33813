"""Markdown report of a finished simulation run folder (plots: :mod:`simulations.plots`)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeGuard

from common.config import PRV_MAX_EPSILON
from server.recorder import not_protected
from simulations.plots import remove_plots, write_plots

__all__ = ["load_metrics", "write_report"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PRIVACY_FILE = "privacy.json"
EVAL_FILE = "eval.json"
CONFIG_FILE = "config.toml"
REPORT_FILE = "report.md"

# Keys of one metrics.jsonl line besides "round". A missing key reads as null.
_FLOAT_KEYS = (
    "train_loss",
    "eval_loss",
    "bleu",
    "rouge_l",
    "max_epsilon",
    "advertiser_epsilon",
    "advertiser_clipping_norm",
    "round_time_s",
)
_COUNT_KEYS = ("num_sampled", "num_replies", "num_declined", "bytes_up", "bytes_down")

_UNIT_MEANINGS = {
    "record": (
        "Record-level DP at each advertiser. The (ε, δ) guarantee covers any one record of "
        "that advertiser, composed over every round the advertiser trained in."
    ),
    "advertiser": (
        "Advertiser-level DP, as in DP-FedAvg. Each advertiser's whole update is clipped "
        "and the aggregate is noised (by the server, or in shares by the clients under "
        "secure aggregation), so the guarantee covers an advertiser's entire data."
    ),
}

# ---------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_metrics_row(row: Any, where: str) -> dict[str, Any]:
    """Return ``row`` with every schema key present, or raise naming ``where``."""
    if not isinstance(row, dict):
        raise TypeError(f"{where}: expected a JSON object, got {type(row).__name__}")

    round_number = row.get("round")
    if not _is_integer(round_number):
        raise TypeError(f"{where}: 'round' is {round_number!r}, expected an integer")
    if round_number < 1:
        raise ValueError(f"{where}: 'round' is {round_number}, expected >= 1 (rounds are 1-based)")

    for key in _FLOAT_KEYS:
        value = row.get(key)
        if value is not None and not _is_number(value):
            raise TypeError(f"{where}: {key!r} is {value!r}, expected a number or null")
    for key in _COUNT_KEYS:
        value = row.get(key)
        if value is None:
            continue
        if not _is_integer(value):
            raise TypeError(f"{where}: {key!r} is {value!r}, expected an integer or null")
        if value < 0:
            raise ValueError(f"{where}: {key!r} is {value}, expected >= 0")

    return dict.fromkeys(_FLOAT_KEYS + _COUNT_KEYS) | row


def load_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    """Read and validate the per-round metrics of a run folder.

    Each non-blank line of ``metrics.jsonl`` must be a JSON object with an integer
    ``round`` >= 1. Numeric keys must be numbers or null, and missing schema keys are
    filled with None. When a round appears twice (a resumed run repeats the rounds after
    its last checkpoint), the later line wins and a warning is logged.

    Returns
    -------
    list of dict
        One dict per round, sorted by round. Empty when the file has no rounds.

    Raises
    ------
    FileNotFoundError
        If ``metrics.jsonl`` does not exist.
    ValueError
        On a line that is not valid JSON or has a value out of range, naming the file and
        the 1-based line number.
    TypeError
        On a line whose JSON value has the wrong type, naming the file and line number.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a run folder written by `fedads simulate`")

    rows: dict[int, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{where}: invalid JSON ({exc.msg} at column {exc.colno}). Each line must "
                    "be one JSON object."
                ) from exc
            row = _validate_metrics_row(parsed, where)
            if row["round"] in rows:
                logger.warning(
                    "load_metrics: round %s appears again at %s, keeping the later line",
                    row["round"],
                    where,
                )
            rows[row["round"]] = row
    return [rows[round_number] for round_number in sorted(rows)]


def _load_json_object(path: Path) -> dict[str, Any]:
    try:
        parsed = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from exc
    if not isinstance(parsed, dict):
        raise TypeError(f"{path}: expected a JSON object, got {type(parsed).__name__}")
    return parsed


def _load_privacy(run_dir: Path) -> dict[str, Any]:
    """Read ``privacy.json`` and check the keys the report cannot do without."""
    path = run_dir / PRIVACY_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found, but every run folder needs its privacy report. Rerun the "
            "simulation or restore the file."
        )
    privacy = _load_json_object(path)
    if not isinstance(privacy.get("dp_enabled"), bool):
        raise TypeError(
            f"{path}: 'dp_enabled' is {privacy.get('dp_enabled')!r}, expected true or false"
        )
    if not isinstance(privacy.get("unit"), str):
        raise TypeError(
            f"{path}: 'unit' is {privacy.get('unit')!r}, expected a string such as 'record'"
        )
    clients = privacy.get("clients", {})
    if not isinstance(clients, dict) or not all(isinstance(c, dict) for c in clients.values()):
        raise TypeError(f"{path}: 'clients' must map each client id to a JSON object")
    privacy["clients"] = clients
    advertiser = privacy.get("advertiser")
    if advertiser is not None and not isinstance(advertiser, dict):
        raise TypeError(f"{path}: 'advertiser' is {advertiser!r}, expected a JSON object or null")
    return privacy


def _any_dp(privacy: dict[str, Any]) -> bool:
    """Return whether record-level or advertiser-level DP was on."""
    return bool(privacy["dp_enabled"] or privacy.get("advertiser"))


# ---------------------------------------------------------------------------
# Formatting helpers
# ---------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".4g") -> str:
    """Format a number, or "n/a" for a missing value."""
    if value is None:
        return "n/a"
    if _is_number(value):
        return format(value, spec)
    return str(value)


def _fmt_bytes(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def _fmt_rounds(rounds: Any) -> str:
    """Format a list of rounds compactly: [1, 2, 3, 5] as "1-3, 5"."""
    if not rounds:
        return "none"
    numbers = sorted({int(r) for r in rounds})
    runs: list[list[int]] = [[numbers[0], numbers[0]]]
    for number in numbers[1:]:
        if number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return ", ".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)


def _fmt_switch(value: Any) -> str:
    """Format a setting that is on, off or unknown (missing from an older privacy.json)."""
    if value is None:
        return "n/a"
    return "on" if value else "off"


def _cell(text: str) -> str:
    """Escape a value for a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _last_value(rows: Sequence[dict[str, Any]], key: str) -> tuple[Any, int | None]:
    """Return the last non-null value of ``key`` and its round."""
    for row in reversed(rows):
        if row.get(key) is not None:
            return row[key], row["round"]
    return None, None


# ---------------------------------------------------------------------------
# Report sections
# ---------------------------------------------------------------------------


def _summary_section(
    rows: Sequence[dict[str, Any]], privacy: dict[str, Any], evaluation: dict[str, Any] | None
) -> list[str]:
    clients = privacy["clients"]
    target = privacy.get("target_epsilon")
    epsilons = [c["epsilon"] for c in clients.values() if _is_number(c.get("epsilon"))]

    train_loss, train_round = _last_value(rows, "train_loss")
    eval_loss, eval_round = _last_value(rows, "eval_loss")
    bleu, bleu_round = _last_value(rows, "bleu")
    bytes_up = sum(row["bytes_up"] or 0 for row in rows)
    bytes_down = sum(row["bytes_down"] or 0 for row in rows)

    def with_round(value: Any, round_number: int | None) -> str:
        return "n/a" if value is None else f"{_fmt(value)} (round {round_number})"

    if privacy["dp_enabled"]:
        max_epsilon = f"{_fmt(max(epsilons), '.2f')}" if epsilons else "n/a"
        epsilon_cell = f"{max_epsilon} / {_fmt(target, '.2f')}"
    else:
        epsilon_cell = "DP off"
    advertiser = privacy.get("advertiser")

    table = [
        ("rounds completed", str(len(rows))),
        ("clients in the privacy ledger", str(len(clients))),
        ("final train loss", with_round(train_loss, train_round)),
        ("final eval loss", with_round(eval_loss, eval_round)),
        ("final BLEU (server evaluation)", with_round(bleu, bleu_round)),
    ]
    if evaluation is not None:
        table.append(("test-set BLEU (eval.json)", _fmt(evaluation.get("bleu"))))
    table += [
        ("max ε / target ε", epsilon_cell),
    ]
    if advertiser:
        advertiser_target = advertiser.get("target_epsilon")
        target_text = _fmt(advertiser_target, ".2f") if advertiser_target else "none set"
        epsilon_text = f"{_fmt(advertiser.get('epsilon'), '.2f')} / {target_text}"
        table.append(("ε / target ε (advertiser level)", epsilon_text))
    table += [
        ("declines, summed over rounds", str(sum(row["num_declined"] or 0 for row in rows))),
        ("bytes up / down", f"{_fmt_bytes(bytes_up)} / {_fmt_bytes(bytes_down)}"),
        ("bytes total", _fmt_bytes(bytes_up + bytes_down)),
    ]
    lines = ["## Summary", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in table]
    return lines + [""]


def _plots_section(
    run_dir: Path, rows: Sequence[dict[str, Any]], privacy: dict[str, Any]
) -> list[str]:
    lines = ["## Training curves", ""]
    if not rows:
        remove_plots(run_dir)
        return lines + [
            (
                f"{METRICS_FILE} contains no rounds: the run ended before its first round "
                "finished, so there is nothing to plot."
            ),
            "",
        ]
    target = privacy.get("target_epsilon")
    series = [("max ε (record level)", "max_epsilon")] if privacy["dp_enabled"] else []
    if privacy.get("advertiser"):
        series.append(("ε (advertiser level)", "advertiser_epsilon"))
    record_target = _is_number(target) and privacy["dp_enabled"]
    return lines + write_plots(
        run_dir,
        rows,
        epsilon_series=series,
        target_epsilon=float(target) if record_target else None,
    )


def _privacy_settings(privacy: dict[str, Any]) -> list[str]:
    """Render the run's privacy settings as a bullet list (n/a for keys older files lack)."""
    accountant = privacy.get("accountant")
    requested = privacy.get("accountant_requested")
    accountant_text = f"`{_fmt(accountant)}`"
    if requested is not None and requested != accountant:
        accountant_text += f" (requested `{requested}`)"
    scrubbing = privacy.get("pii_scrubbing")
    if not isinstance(scrubbing, dict):
        scrubbing_text = "n/a"
    elif scrubbing.get("enabled"):
        scrubbing_text = f"on ({', '.join(scrubbing.get('kinds') or [])})"
        if scrubbing.get("counts_sent_to_server"):
            total = scrubbing.get("replaced_total")
            scrubbing_text += f", {_fmt(total)} replacements reported to the server"
        else:
            scrubbing_text += ", counts kept on the clients"
    else:
        scrubbing_text = "off"
    units = privacy.get("units")
    unit_text = ", ".join(f"`{unit}`" for unit in units) if units else f"`{privacy['unit']}`"
    lines = [
        f"- unit: {unit_text}",
        f"- accountant: {accountant_text}",
        f"- δ: {_fmt(privacy.get('delta'), '.1e')}",
        f"- target ε: {_fmt(privacy.get('target_epsilon'), '.2f')}",
        f"- clipping norm: {_fmt(privacy.get('clipping_norm'))}",
        f"- rounds planned: {_fmt(privacy.get('num_rounds'))}",
        f"- secure mode (cryptographic noise): {_fmt_switch(privacy.get('secure_mode'))}",
        f"- secure aggregation: {_fmt_switch(privacy.get('secure_aggregation'))}",
        f"- PII scrubbing: {scrubbing_text}",
        f"- public warm start (no DP): {_warm_start_text(privacy.get('warm_start'))}",
        "",
    ]
    note = privacy.get("accountant_note")
    if isinstance(note, str) and note:
        lines += [f"NOTE: {note}.", ""]
    settings = privacy.get("secure_aggregation_settings")
    if privacy.get("secure_aggregation") and isinstance(settings, dict):
        lines += [
            (f"NOTE: {settings.get('update_validation')}. Clients clip to "
             f"{_client_clip_text(settings.get('client_clip_norm'))}; "
             f"{_fmt(settings.get('protocol'))} "
             f"with threshold fraction {_fmt(settings.get('threshold_fraction'))} and a "
             f"2^{_fmt(settings.get('modulus_bits'))} modulus."),
            "",
        ]
    return lines


def _client_clip_text(norm: Any) -> str:
    if norm is None:
        return "each round's advertiser-level clipping norm"
    return f"L2 norm {_fmt(norm)}"


def _warm_start_text(warm_start: Any) -> str:
    if not isinstance(warm_start, dict):
        return "off"
    return (
        f"{_fmt(warm_start.get('num_records'))} records of `{warm_start.get('file')}`, "
        f"{_fmt(warm_start.get('steps'))} steps (epochs: {_fmt(warm_start.get('epochs'))})"
    )


def _privacy_section(privacy: dict[str, Any]) -> list[str]:
    unit = privacy["unit"]
    accountant = privacy.get("accountant")
    target = privacy.get("target_epsilon")
    lines = ["## Privacy", ""]

    if not _any_dp(privacy):
        lines += [
            (
                "**Differential privacy was OFF for this run.** No noise was added, so the "
                "run gives no (ε, δ) guarantee and any ε below is not a privacy guarantee."
            ),
            "",
        ]
    elif not privacy["dp_enabled"]:
        lines += [
            (
                "**Record-level DP was OFF for this run.** Clients trained without noise, so "
                "only the advertiser-level guarantee below applies."
            ),
            "",
        ]
    if privacy.get("advertiser"):
        lines += [
            (
                "The settings and the client table below are those of record-level DP; "
                "advertiser-level DP has its own section after them."
            ),
            "",
        ]
    lines += _privacy_settings(privacy)
    # The advertiser section, after the record-level table, explains its own unit.
    if unit in _UNIT_MEANINGS and not (unit == "advertiser" and privacy.get("advertiser")):
        lines += [_UNIT_MEANINGS[unit], ""]

    clients = privacy["clients"]
    if not clients:
        return lines + ["No per-client privacy accounting was recorded.", ""]

    lines += [
        (
            "| client | ε | δ | accountant | noise multiplier | sample rate | steps "
            "| rounds joined | declined rounds |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    over_prv_range = False
    insecure_clients = []
    for client_id in sorted(clients):
        entry = clients[client_id]
        epsilon = entry.get("epsilon")
        epsilon_text = _fmt(epsilon, ".2f")
        if _is_number(epsilon) and _is_number(target) and epsilon > target:
            epsilon_text += " (over target)"
        client_accountant = entry.get("accountant") or accountant
        if (
            client_accountant == "prv"
            and _is_number(epsilon)
            and math.isfinite(epsilon)
            and epsilon > PRV_MAX_EPSILON
        ):
            over_prv_range = True
        if privacy.get("secure_mode") and entry.get("secure_mode") is False:
            insecure_clients.append(client_id)
        cells = [
            client_id,
            epsilon_text,
            _fmt(entry.get("delta"), ".1e"),
            _fmt(client_accountant),
            _fmt(entry.get("noise_multiplier")),
            _fmt(entry.get("sample_rate")),
            _fmt(entry.get("steps")),
            _fmt_rounds(entry.get("rounds_joined")),
            _fmt_rounds(entry.get("declined_rounds")),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines.append("")
    if over_prv_range:
        lines += [
            (
                f"NOTE: the PRV accountant is inaccurate above ε ≈ {PRV_MAX_EPSILON:g}, "
                "so treat the larger ε values above as estimates."
            ),
            "",
        ]
    if insecure_clients:
        lines += [
            (
                f"NOTE: clients {', '.join(insecure_clients)} reported training without secure "
                "mode, although the run asked for it."
            ),
            "",
        ]
    return lines


def _advertiser_section(advertiser: dict[str, Any]) -> list[str]:
    """Render the advertiser-level guarantee and the clipping norm of every round."""
    get = advertiser.get
    target = get("target_epsilon")
    target_text = _fmt(target, ".2f") if target else "none set"
    calibrated = " (calibrated from the target ε)" if get("noise_multiplier_calibrated") else ""
    lines = [
        "### Advertiser-level DP",
        "",
        _UNIT_MEANINGS["advertiser"],
        "",
        (
            f"- ε: {_fmt(get('epsilon'), '.3f')} at δ = {_fmt(get('delta'), '.1e')} "
            f"(target ε: {target_text})"
        ),
        (
            f"- accountant: `{_fmt(get('accountant'))}`, rounds accounted: "
            f"{_fmt(get('rounds_accounted'))} of {_fmt(get('num_rounds'))}"
        ),
        (
            f"- noise multiplier: {_fmt(get('noise_multiplier'))}{calibrated}, on the update: "
            f"{_fmt(get('update_noise_multiplier'))}"
        ),
        f"- clipping: {_fmt(get('clipping'))}, initial norm {_fmt(get('initial_clipping_norm'))}",
        *_noise_lines(advertiser),
        f"- sample rate (planned): {_fmt(get('planned_sample_rate'))}",
        f"- sampling: {_fmt(get('sampling'))}",
        f"- weighting: {_fmt(get('weighting'))}",
    ]
    if get("clipping") == "adaptive":
        lines.append(
            f"- target quantile: {_fmt(get('target_quantile'))}, clip learning rate: "
            f"{_fmt(get('clip_learning_rate'))}, clipped-count noise stddev: "
            f"{_fmt(get('clipped_count_stddev'))}"
        )
    lines.append("")
    note = get("accountant_note")
    if isinstance(note, str) and note:
        lines += [f"NOTE: {note}.", ""]
    rounds = get("rounds") or []
    if not rounds:
        return lines + ["No round aggregated with advertiser-level DP yet.", ""]
    lines += [
        "| round | clipping norm | noise stddev on the mean | sampled | sample rate | "
        + "noised unclipped fraction |",
        "|---|---|---|---|---|---|",
    ]
    for entry in rounds:
        cells = [
            _fmt(entry.get("server_round")),
            _fmt(entry.get("clipping_norm")),
            _fmt(entry.get("noise_stddev")),
            _fmt(entry.get("num_sampled")),
            _fmt(entry.get("sample_rate")),
            _fmt(entry.get("unclipped_fraction"), ".3f"),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines + [""]


def _noise_lines(advertiser: dict[str, Any]) -> list[str]:
    """Render who added the advertiser-level noise; files without the key had the server."""
    get = advertiser.get
    if not str(get("noise_added_by") or "").startswith("clients"):
        return ["- noise: added by the server to the mean (central)"]
    lines = [
        (
            "- noise: added by the clients under secure aggregation (distributed), each "
            f"share of stddev {_fmt(get('noise_share_stddev'))} in the last round, "
            f"calibrated for at least {_fmt(get('min_survivors'))} survivors"
        )
    ]
    if get("count_share_stddev") is not None:
        lines.append(f"- clipped-count noise share stddev: {_fmt(get('count_share_stddev'))}")
    note = get("noise_note")
    if isinstance(note, str) and note:
        lines.append(f"- noise note: {note}")
    return lines


def _not_protected_section(privacy: dict[str, Any]) -> list[str]:
    """Render what the run leaves unprotected, or the general list for older files."""
    items = privacy.get("not_protected")
    if not (isinstance(items, list) and all(isinstance(item, str) for item in items)):
        items = not_protected()
    return ["## What is not protected", "", *[f"- {item}" for item in items], ""]


def _evaluation_section(evaluation: dict[str, Any] | None) -> list[str]:
    lines = ["## Test-set evaluation", ""]
    if evaluation is None:
        return lines + [f"No test-set evaluation ({EVAL_FILE}) in this run folder.", ""]
    return lines + [
        f"- test file: `{_fmt(evaluation.get('test_file'))}`",
        f"- sources: {_fmt(evaluation.get('num_sources'))}",
        f"- BLEU: {_fmt(evaluation.get('bleu'), '.2f')}",
        f"- ROUGE-L: {_fmt(evaluation.get('rouge_l'), '.2f')}",
        f"- slot error rate: {_fmt(evaluation.get('slot_error_rate'), '.3f')}",
        "",
    ]


def _config_section(run_dir: Path) -> list[str]:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return ["## Configuration", "", f"{CONFIG_FILE} not found in this run folder.", ""]
    return ["## Configuration", "", "```toml", path.read_text(encoding="utf-8").rstrip(), "```", ""]


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def write_report(run_dir: Path) -> Path:
    """Write ``report.md`` and its plots (``loss.png``, ``bleu.png``, ``epsilon.png``).

    Parameters
    ----------
    run_dir : Path
        A run folder written by ``fedads simulate``: ``metrics.jsonl`` and
        ``privacy.json`` are required, ``eval.json`` and ``config.toml`` optional.

    Returns
    -------
    Path
        The path of ``report.md``. Plots without data are not written, and the report
        states why.

    Raises
    ------
    FileNotFoundError
        If the folder, ``metrics.jsonl`` or ``privacy.json`` is missing.
    ValueError, TypeError
        If a file is not valid JSON or does not match its schema (see :func:`load_metrics`).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run_dir {run_dir} is not a folder: pass the folder that `fedads simulate` wrote"
        )

    rows = load_metrics(run_dir)
    privacy = _load_privacy(run_dir)
    eval_path = run_dir / EVAL_FILE
    evaluation = _load_json_object(eval_path) if eval_path.is_file() else None
    if not rows:
        logger.warning(
            "write_report: %s has no rounds, writing a report without curves",
            run_dir / METRICS_FILE,
        )
    if not _any_dp(privacy):
        logger.warning(
            "write_report: DP was off in %s, the report marks the run unprotected", run_dir
        )

    lines = [f"# Run report: {run_dir.name}", ""]
    lines += _summary_section(rows, privacy, evaluation)
    lines += _plots_section(run_dir, rows, privacy)
    lines += _evaluation_section(evaluation)
    lines += _privacy_section(privacy)
    if privacy.get("advertiser"):
        lines += _advertiser_section(privacy["advertiser"])
    lines += _not_protected_section(privacy)
    lines += _config_section(run_dir)

    report_path = run_dir / REPORT_FILE
    report_path.write_text("\n".join(lines), encoding="utf-8")
    logger.info("write_report: wrote %s", report_path)
    return report_path
