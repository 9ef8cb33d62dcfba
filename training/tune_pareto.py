"""The accuracy-vs-MACs Pareto front of a policy search, and its figure.

Pure functions over trial records (dicts with at least ``accuracy`` and ``macs``), so the front
can be checked without Ray and recomputed from a saved ``trials.json``.

Example::

    from metaprune.training.tune_pareto import pareto_front, plot_trials

    trials = [{"accuracy": 0.90, "macs": 500}, {"accuracy": 0.85, "macs": 300},
              {"accuracy": 0.80, "macs": 400}]
    pareto_front(trials)                   # [1, 0]: cheapest first; (0.80, 400) is dominated
    plot_trials(trials, [1, 0], "front.png", title="cnn1d, mnist1d")
"""

import math
import os
from collections.abc import Sequence
from pathlib import Path


def pareto_front(trials: Sequence[dict]) -> list[int]:
    """Indices of the trials no other trial beats on both objectives, fewest MACs first.

    A trial is dominated when another has accuracy >= and MACs <= with at least one strictly
    better. Trials whose accuracy or MACs is missing or NaN (failed trials) take no part. Of
    exact duplicates the first is kept, so the front never lists the same point twice.

    Example::

        pareto_front([{"accuracy": 0.9, "macs": 500}, {"accuracy": 0.9, "macs": 600},
                      {"accuracy": 0.7, "macs": 100}])     # [2, 0]
    """
    usable = [
        index for index, trial in enumerate(trials)
        if _is_number(trial.get("accuracy")) and _is_number(trial.get("macs"))
    ]
    # Cheapest first, most accurate first among equal MACs: a trial is on the front exactly
    # when it is more accurate than every trial before it in this order.
    usable.sort(key=lambda index: (trials[index]["macs"], -trials[index]["accuracy"], index))
    front, best_accuracy = [], -math.inf
    for index in usable:
        if trials[index]["accuracy"] > best_accuracy:
            front.append(index)
            best_accuracy = trials[index]["accuracy"]
    return front


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_trials(trials: Sequence[dict], front: Sequence[int], png_path: str | os.PathLike, *,
                title: str = "", best: int | None = None,
                target_macs: float | None = None) -> Path:
    """Scatter of accuracy against MACs of every trial, the Pareto front drawn as a staircase.

    Args:
        trials: records with ``accuracy`` and ``macs`` (others are skipped); one whose
            ``status`` is present and not ``"complete"`` is drawn hollow.
        front: indices into `trials`, as `pareto_front` returns them.
        png_path: where the PNG goes (folders are created).
        title: the figure's title.
        best: index of the chosen trial, ringed in the figure (None: none).
        target_macs: MACs of the requested speed-up, drawn as a vertical line (None: none).

    Example::

        plot_trials(trials, pareto_front(trials), "tune-out/trials.png", best=3,
                    target_macs=macs_before / 2)
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: this runs in CLIs, workers and tests
    from matplotlib import pyplot as plt

    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plotted = [t for t in trials if _is_number(t.get("accuracy")) and _is_number(t.get("macs"))]
    # A trial a scheduler stopped early scored fewer fine-tune epochs: drawn hollow.
    finished = [t for t in plotted if t.get("status", "complete") == "complete"]
    stopped = [t for t in plotted if t.get("status", "complete") != "complete"]
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    try:
        if finished:
            axes.scatter([t["macs"] for t in finished], [t["accuracy"] for t in finished], s=18,
                         color="#9aa7b4", label=f"trials ({len(finished)})")
        if stopped:
            axes.scatter([t["macs"] for t in stopped], [t["accuracy"] for t in stopped], s=18,
                         facecolors="none", edgecolors="#9aa7b4",
                         label=f"stopped early ({len(stopped)})")
        if front:
            macs = [trials[i]["macs"] for i in front]
            accuracy = [trials[i]["accuracy"] for i in front]
            axes.step(macs, accuracy, where="post", color="#c0392b", linewidth=1.2)
            axes.scatter(macs, accuracy, s=30, color="#c0392b", zorder=3,
                         label=f"Pareto front ({len(front)})")
        if best is not None:
            axes.scatter([trials[best]["macs"]], [trials[best]["accuracy"]], s=140,
                         facecolors="none", edgecolors="#1f4e79", linewidths=1.5, zorder=4,
                         label="best meeting the target")
        if target_macs is not None:
            axes.axvline(target_macs, color="#1f4e79", linestyle="--", linewidth=0.8,
                         label="target MACs")
        axes.set_xlabel("MACs after pruning (batch 1)")
        axes.set_ylabel("test accuracy after fine-tuning")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="lower right")
        figure.savefig(path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path
