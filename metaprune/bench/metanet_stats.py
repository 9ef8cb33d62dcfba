"""Statistics of `metaprune bench metanet`: row means, paired differences, the best classic row.

Runs are dicts with ``model``, ``family``, ``speedup``, ``budget``, ``method``, ``seed`` and
``accuracy`` (a fraction). Seeds of one model are averaged first, so every standard error is
over models (the larger source of spread), and a difference is paired by model and seed.

Example::

    rows = row_means(runs, speedup=3.0, budget=1)       # method -> (mean, s.e., models)
    best = best_classic(runs, speedup=3.0, budget=1)    # "bn_scale/global"
    mean, error, low, n = paired(runs, 3.0, 1, "metanet", best)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

LEARNED_ROWS = ("metanet", "null-metanet", "sparse-learning")


def is_classic(method: str) -> bool:
    """Classic rows are named CRITERION/ALLOCATION."""
    return "/" in method


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    values = list(values)
    mean = statistics.fmean(values)
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, error


def t_quantile_95(samples: int) -> float:
    """One-sided 95 % quantile of Student's t with ``samples - 1`` degrees of freedom."""
    if samples < 2:
        return float("inf")
    from scipy.stats import t

    return float(t.ppf(0.95, samples - 1))


def per_model(runs: Iterable[dict], speedup: float, budget: int, method: str,
              family: str | None = None) -> dict[str, float]:
    """Model -> accuracy averaged over its seeds, for one row."""
    found: dict[str, list[float]] = {}
    for run in runs:
        if (run["speedup"] == speedup and run["budget"] == budget and run["method"] == method
                and (family is None or run["family"] == family)):
            found.setdefault(run["model"], []).append(run["accuracy"])
    return {model: statistics.fmean(values) for model, values in found.items()}


def methods_of(runs: Iterable[dict]) -> list[str]:
    """Every row name, learned rows first, then classic rows sorted."""
    names = {run["method"] for run in runs}
    compared = sorted(m for m in names if m.startswith("metanet@"))  # other checkpoints
    return [m for m in LEARNED_ROWS if m in names] + compared \
        + sorted(m for m in names if is_classic(m))


def row_means(runs: Sequence[dict], speedup: float, budget: int,
              family: str | None = None) -> dict[str, tuple[float, float, int]]:
    """Method -> (mean, standard error over models, models) at one speed-up and budget."""
    table = {}
    for method in methods_of(runs):
        values = per_model(runs, speedup, budget, method, family)
        if values:
            table[method] = (*mean_and_error(values.values()), len(values))
    return table


def best_classic(runs: Sequence[dict], speedup: float, budget: int,
                 family: str | None = None) -> str | None:
    """The classic row with the highest mean, among rows that cover every model of the cell.

    Chosen on the reported data on purpose: it favours the baseline. A row that cannot prune
    some model (bn_scale without norm layers) is not eligible, its mean being over fewer models.
    """
    table = row_means(runs, speedup, budget, family)
    if not table:
        return None
    models = max(entry[2] for entry in table.values())
    eligible = {m: entry for m, entry in table.items() if is_classic(m) and entry[2] == models}
    return max(eligible, key=lambda m: eligible[m][0]) if eligible else None


def paired(runs: Sequence[dict], speedup: float, budget: int, method: str, baseline: str,
           family: str | None = None) -> tuple[float, float, float, int]:
    """(mean, s.e., lower one-sided 95 % bound, models) of `method` - `baseline` in accuracy.

    Paired by model and seed; seeds averaged per model first. ``(nan, nan, nan, 0)`` with no pair.
    """
    left: dict[tuple[str, int], float] = {}
    right: dict[tuple[str, int], float] = {}
    for run in runs:
        if run["speedup"] != speedup or run["budget"] != budget:
            continue
        if family is not None and run["family"] != family:
            continue
        key = (run["model"], run["seed"])
        if run["method"] == method:
            left[key] = run["accuracy"]
        elif run["method"] == baseline:
            right[key] = run["accuracy"]
    differences: dict[str, list[float]] = {}
    for key in left.keys() & right.keys():
        differences.setdefault(key[0], []).append(left[key] - right[key])
    if not differences:
        return math.nan, math.nan, math.nan, 0
    mean, error = mean_and_error([statistics.fmean(v) for v in differences.values()])
    low = mean - t_quantile_95(len(differences)) * error
    return mean, error, low, len(differences)
