"""PNG plots of a run's per-round metrics, for the run report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["PLOT_FILES", "plot_rounds", "remove_plots", "write_plots"]

PLOT_FILES = ("loss.png", "bleu.png", "epsilon.png")


def plot_rounds(
    path: Path,
    *,
    title: str,
    ylabel: str,
    rows: Sequence[dict[str, Any]],
    series: Sequence[tuple[str, str]],
    hline: tuple[str, float] | None = None,
    y_from_zero: bool = False,
) -> bool:
    """Plot ``(label, key)`` series per round into ``path`` and return whether it was written.

    Rounds where a key is null are skipped. When no series has a value, no file is
    written and a stale one from an earlier report is removed.
    """
    points = []
    for label, key in series:
        xs = [row["round"] for row in rows if row.get(key) is not None]
        ys = [row[key] for row in rows if row.get(key) is not None]
        if xs:
            points.append((label, xs, ys))
    if not points:
        path.unlink(missing_ok=True)
        return False

    # A bare Figure with the Agg canvas needs no display and leaves pyplot's global state alone.
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, xs, ys in points:
        axes.plot(xs, ys, marker="o", label=label)
    if hline is not None:
        axes.axhline(hline[1], color="tab:red", linestyle="--", label=hline[0])
    if y_from_zero:
        axes.set_ylim(bottom=0.0)
    axes.set_title(title)
    axes.set_xlabel("round")
    axes.set_ylabel(ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=100)
    return True


def remove_plots(run_dir: Path) -> None:
    """Delete the plots of an earlier report, when the metrics no longer give any."""
    for name in PLOT_FILES:
        (run_dir / name).unlink(missing_ok=True)


def write_plots(
    run_dir: Path,
    rows: Sequence[dict[str, Any]],
    *,
    epsilon_series: Sequence[tuple[str, str]],
    target_epsilon: float | None,
) -> list[str]:
    """Write ``loss.png``, ``bleu.png`` and ``epsilon.png`` into ``run_dir``.

    Returns the report's Markdown lines: an image link per plot written, or a sentence
    saying why a plot is missing. ``epsilon_series`` contains (label, metrics key) pairs of
    the ε curves, one per privacy unit; ``epsilon.png`` is written only when it is not
    empty, with ``target_epsilon`` as a dashed line when it is known.
    """
    lines: list[str] = []
    if plot_rounds(
        run_dir / "loss.png",
        title="Loss per round",
        ylabel="loss",
        rows=rows,
        series=[("train loss", "train_loss"), ("eval loss", "eval_loss")],
    ):
        lines += ["![Train and eval loss per round](loss.png)", ""]
    else:
        lines += ["No round reported a train or eval loss.", ""]

    if plot_rounds(
        run_dir / "bleu.png",
        title="BLEU per round (server evaluation)",
        ylabel="BLEU",
        rows=rows,
        series=[("BLEU", "bleu")],
    ):
        lines += ["![BLEU per round](bleu.png)", ""]
    else:
        lines += ["No round ran a server BLEU evaluation.", ""]

    hline = ("target ε", target_epsilon) if target_epsilon is not None else None
    if not epsilon_series:
        (run_dir / "epsilon.png").unlink(missing_ok=True)
        lines += ["DP was off, so there is no ε to plot.", ""]
    elif plot_rounds(
        run_dir / "epsilon.png",
        title="ε spent per round",
        ylabel="ε",
        rows=rows,
        series=list(epsilon_series),
        hline=hline,
        y_from_zero=True,
    ):
        lines += ["![ε per round and target ε](epsilon.png)", ""]
    else:
        lines += ["No round reported an ε.", ""]
    return lines
