"""Markdown tables and the attack summary of a ``benchmark.json`` result."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from simulations.benchmark_rows import format_overrides


def attack_summary(utility: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Collect BLEU of the clean, attacked-unprotected and attacked-protected runs per ε.

    A ratio is None while its run or the clean run is missing, or when the clean BLEU is 0.
    """
    groups: dict[str, dict[str, Any]] = {}
    for name, entry in utility.items():
        if entry.get("mode") != "attack" or not entry.get("role"):
            continue
        group = groups.setdefault(f"ε={entry['epsilon']:g}", {})
        group[f"{entry['role']}_bleu"] = entry["bleu"]
        group[f"{entry['role']}_name"] = name
    for group in groups.values():
        clean = group.get("clean_bleu")
        for role in ("unprotected", "protected"):
            bleu = group.get(f"{role}_bleu")
            group[f"{role}_over_clean"] = bleu / clean if clean and bleu is not None else None
    return groups


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _cell(overrides: Mapping[str, Any] | None) -> str:
    text = format_overrides(overrides or {})
    return f"`{text}`" if text else "(base config)"


def format_table(results: Mapping[str, Any]) -> str:
    """Format the utility rows, attack ratios, exposure rows and cost figures as Markdown."""
    lines = []
    setup = results.get("setup")
    if setup:
        scale = format_overrides(setup["scale"]) or "none (full size)"
        limit = setup["eval_limit"] or "all"
        lines += [
            f"Base config: `{setup['config']}` ({results.get('base', '')})",
            f"Scale overrides on every row: {scale}; held-out sources scored: {limit}",
            "",
        ]
    lines += [
        "| setup | BLEU | ROUGE-L | slot error rate | config diff |",
        "|---|---|---|---|---|",
    ]
    for name, scores in results.get("utility", {}).items():
        ser = scores["slot_error_rate"]
        lines.append(
            f"| {name} | {scores['bleu']:.2f} | {scores['rouge_l']:.2f} | "
            f"{'n/a' if ser is None else f'{ser:.3f}'} | {_cell(scores.get('config_diff'))} |"
        )
    for epsilon, group in results.get("attack", {}).items():
        lines.append(
            f"\nAttack at {epsilon}: BLEU clean {_ratio(group.get('clean_bleu'))}, attacked "
            f"unprotected {_ratio(group.get('unprotected_bleu'))}, attacked protected "
            f"{_ratio(group.get('protected_bleu'))}; attacked-protected / clean "
            f"{_ratio(group['protected_over_clean'])}, attacked-unprotected / clean "
            f"{_ratio(group['unprotected_over_clean'])}"
        )
    if results.get("exposure"):
        lines += [
            "",
            (
                "| setup | exposure (bits) | max (bits) | rank | extrapolated (bits) | ε spent "
                "| config diff |"
            ),
            "|---|---|---|---|---|---|---|",
        ]
        for name, entry in results["exposure"].items():
            spent = entry["epsilon_spent"]
            extrapolated = entry.get("extrapolated_bits")
            lines.append(
                f"| {name} | {entry['bits']:.2f} | {entry['max_bits']:.2f} | {entry['rank']} | "
                f"{'n/a' if extrapolated is None else f'{extrapolated:.2f}'} | "
                f"{'off' if spent is None else f'{spent:.2f}'} | {_cell(entry['config_diff'])} |"
            )
    if "step_time" in results:
        st = results["step_time"]
        lines.append(
            f"\nDP step / non-DP step: {st['dp_over_non_dp']:.3f} "
            f"({st['dp_step_s']:.3f} s / {st['non_dp_step_s']:.3f} s)"
        )
    if "payload" in results:
        pl = results["payload"]
        lines.append(
            f"Adapter bytes per client per round / base model bytes: {pl['ratio']:.4f} "
            f"({pl['adapter_bytes']} / {pl['base_bytes']})"
        )
    return "\n".join(lines)
