"""Figures of a pruning report."""

import os
from pathlib import Path


def plot_sparsity(report: dict, png_path: str | os.PathLike) -> Path:
    """Bar chart of the kept fraction of output channels per layer (matplotlib, Agg backend).

    Example::

        plot_sparsity(result.report, "pruned.sparsity.png")
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: this runs in CLIs, workers and tests
    from matplotlib import pyplot as plt

    names = list(report["kept"])
    fractions = [kept / total for kept, total in report["kept"].values()]
    width = max(6.0, 0.25 * len(names))
    figure, axes = plt.subplots(figsize=(width, 4.0))
    try:
        axes.bar(range(len(names)), fractions, color="#4878a8")
        axes.set_xticks(range(len(names)))
        axes.set_xticklabels(names, rotation=90, fontsize=6)
        axes.set_ylim(0.0, 1.05)
        axes.set_ylabel("kept fraction of output channels")
        speedup = report.get("speedup")
        title = f"{report.get('criterion', '')}, {report.get('allocation', '')}"
        if speedup:
            title += f", {speedup:.2f}x fewer MACs"
        axes.set_title(title)
        figure.tight_layout()
        path = Path(png_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
    return path
