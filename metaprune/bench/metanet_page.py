"""`benchmarks/metanet.md` and its PNG from the runs of `metaprune bench metanet`.

The page states the issue's goals and whether each is met, from the same runs it tabulates:
small budget (0 and 1 epochs) at 3x and 4x, metanetwork - best classic >= +3 points; equal
budget (4 epochs) at 3x, paired mean >= +0.5 point with a lower 95 % bound above 0 and no family
below best classic - 0.3 point; the rewrite-alone guard (<= 1 point of dense accuracy).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from metaprune.bench.metanet_stats import (
    best_classic,
    methods_of,
    paired,
    row_means,
)

SMALL_BUDGET_GOAL = 3.0  # points, metanet - best classic at budgets 0 and 1, 3x and 4x
EQUAL_BUDGET_GOAL = 0.5  # points, paired mean at 4 epochs and 3x
FAMILY_FLOOR = -0.3  # points: no family below best classic by more than this, at any budget
GUARD_POINTS = 1.0


def _points(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:+.2f}"


def _cell(entry) -> str:
    if entry is None:
        return "—"
    mean, error, models = entry
    return f"{100 * mean:.2f} ± {100 * error:.2f} ({models})"


def _families(runs) -> list[str]:
    return sorted({run["family"] for run in runs})


def _goal_lines(runs, settings) -> list[str]:
    """The Must-show checks, each with its figure and MET / NOT MET."""
    lines = []
    for speedup in (3.0, 4.0):
        for budget in (0, 1):
            if speedup not in settings["speedups"] or budget not in settings["budgets"]:
                continue
            best = best_classic(runs, speedup, budget)
            if best is None:
                continue
            mean, error, low, models = paired(runs, speedup, budget, "metanet", best)
            met = not math.isnan(mean) and 100 * mean >= SMALL_BUDGET_GOAL
            lines.append(f"- {speedup:g}×, budget {budget}: metanet − best classic ({best}) = "
                         f"{_points(mean)} ± {100 * error:.2f} pts over {models} models → "
                         f"**{'MET' if met else 'NOT MET'}** (goal ≥ +{SMALL_BUDGET_GOAL} pts)"
                         + _without_head(runs, speedup, budget, best))
    if 3.0 in settings["speedups"] and 4 in settings["budgets"]:
        best = best_classic(runs, 3.0, 4)
        if best is not None:
            mean, error, low, models = paired(runs, 3.0, 4, "metanet", best)
            met = (not math.isnan(mean) and 100 * mean >= EQUAL_BUDGET_GOAL and low > 0)
            lines.append(f"- 3×, budget 4 (equal budget): metanet − best classic ({best}) = "
                         f"{_points(mean)} ± {100 * error:.2f} pts, lower 95 % bound "
                         f"{_points(low)} over {models} models → **{'MET' if met else 'NOT MET'}**"
                         f" (goal ≥ +{EQUAL_BUDGET_GOAL} with the bound above 0)"
                         + _without_head(runs, 3.0, 4, best))
    worst = None
    for speedup in settings["speedups"]:
        for budget in settings["budgets"]:
            for family in _families(runs):
                best = best_classic(runs, speedup, budget, family)
                if best is None:
                    continue
                mean, _, _, _ = paired(runs, speedup, budget, "metanet", best, family)
                if not math.isnan(mean) and (worst is None or mean < worst[0]):
                    worst = (mean, family, speedup, budget, best)
    if worst is not None:
        met = 100 * worst[0] >= FAMILY_FLOOR
        lines.append(f"- Worst family cell: {worst[1]} at {worst[2]:g}×, budget {worst[3]}: "
                     f"metanet − best classic for that family ({worst[4]}) = "
                     f"{_points(worst[0])} pts → **{'MET' if met else 'NOT MET'}** "
                     f"(goal: no family below {FAMILY_FLOOR} pts at any budget)")
    return lines


def _without_head(runs, speedup: float, budget: int, best: str) -> str:
    """The same cell for the null metanetwork (the measured candidates, nothing learned), and
    what the head adds: stated beside each goal, since part of the gain is not learned."""
    null, _, _, models = paired(runs, speedup, budget, "null-metanet", best)
    if models == 0:
        return ""
    added, error, low, _ = paired(runs, speedup, budget, "metanet", "null-metanet")
    return (f"; without the head (null metanet) − best classic = {_points(null)}, "
            f"metanet − null metanet = {_points(added)} ± {100 * error:.2f} "
            f"[{_points(low)}]")


def _guard_lines(guards) -> list[str]:
    if not guards:
        return ["No guard measured."]
    lines = ["| model | family | checkpoint | dense | after rewrite | change (pts) |",
             "|---|---|---|---|---|---|"]
    worst = 0.0
    for guard in sorted(guards, key=lambda g: g["model"]):
        change = guard["rewritten"] - guard["dense"]
        worst = min(worst, change)
        lines.append(f"| {guard['model']} | {guard['family']} | "
                     f"{guard.get('checkpoint_name') or '—'} | {100 * guard['dense']:.2f} | "
                     f"{100 * guard['rewritten']:.2f} | {100 * change:+.2f} |")
    met = -100 * worst <= GUARD_POINTS
    lines += ["", f"Worst change {100 * worst:+.2f} pts → **{'MET' if met else 'NOT MET'}** "
                  f"(goal: the rewrite alone costs ≤ {GUARD_POINTS:g} pt on every held-out model)"]
    return lines


def _tables(runs, settings) -> list[str]:
    lines = []
    for speedup in settings["speedups"]:
        lines += [f"### {speedup:g}× fewer MACs", "",
                  "Accuracy in %, mean ± s.e. over models (models); seeds averaged per model.", "",
                  "| row | " + " | ".join(f"budget {b}" for b in settings["budgets"]) + " |",
                  "|---|" + "---|" * len(settings["budgets"])]
        tables = {b: row_means(runs, speedup, b) for b in settings["budgets"]}
        best = {b: best_classic(runs, speedup, b) for b in settings["budgets"]}
        for method in methods_of([r for r in runs if r["speedup"] == speedup]):
            cells = []
            for budget in settings["budgets"]:
                cell = _cell(tables[budget].get(method))
                cells.append(f"**{cell}**" if method == best[budget] else cell)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", "Paired differences in points (mean ± s.e. over models; "
                      "lower one-sided 95 % bound):", "",
                  "| difference | family | " + " | ".join(f"budget {b}"
                                                           for b in settings["budgets"]) + " |",
                  "|---|---|" + "---|" * len(settings["budgets"])]
        compared = [m for m in methods_of(runs) if m.startswith("metanet@")]
        for family in [None, *_families(runs)]:
            for label, method, baseline in (
                    ("metanet − best classic", "metanet", None),
                    ("metanet − null metanet", "metanet", "null-metanet"),
                    ("metanet − l2/global (its fallback)", "metanet", "l2/global"),
                    *((f"metanet − {other}", "metanet", other) for other in compared),
                    ("sparse-learning − best classic", "sparse-learning", None)):
                cells = []
                for budget in settings["budgets"]:
                    reference = baseline or best_classic(runs, speedup, budget, family)
                    if reference is None:
                        cells.append("—")
                        continue
                    mean, error, low, models = paired(runs, speedup, budget, method, reference,
                                                      family)
                    cells.append("—" if models == 0 else
                                 f"{_points(mean)} ± {100 * error:.2f} [{_points(low)}]"
                                 + (f" vs {reference}" if baseline is None else ""))
                lines.append(f"| {label} | {family or 'all'} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _choice_lines(runs, settings) -> list[str]:
    """How often each allocation candidate was chosen, per metanet-path row and budget (runs
    logged before the choice was recorded are left out)."""
    counts: dict[tuple[str, int], dict[str, int]] = {}
    for run in runs:
        if run.get("choice"):
            cell = counts.setdefault((run["method"], run["budget"]), {})
            cell[run["choice"]] = cell.get(run["choice"], 0) + 1
    if not counts:
        return []
    lines = ["## Which candidate the choice took", "",
             "Runs per chosen candidate (all models, speed-ups and seeds; `head@s`: the "
             "sparsity head's policy at strength s, `measured@s`: the measured allocation, "
             "`uniform`: neither).", "",
             "| row | budget | " + " | ".join(["chosen"]) + " |", "|---|---|---|"]
    for (method, budget), cell in sorted(counts.items()):
        total = sum(cell.values())
        lines.append(f"| {method} | {budget} | " + ", ".join(
            f"{name} {count} ({100 * count / total:.0f} %)"
            for name, count in sorted(cell.items(), key=lambda item: -item[1])) + " |")
    return lines + [""]


def plot(path: Path, runs, settings) -> Path:
    """Accuracy against budget, one panel per speed-up: metanet, null, best classic, l2/global,
    sparse learning (mean over models, error bars = s.e.)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    speedups = settings["speedups"]
    figure, axes = plt.subplots(1, len(speedups), figsize=(4.2 * len(speedups), 3.6),
                                squeeze=False)
    try:
        for axis, speedup in zip(axes[0], speedups):
            budgets = settings["budgets"]
            compared = [m for m in methods_of(runs) if m.startswith("metanet@")]
            series = {"metanet": [], **{name: [] for name in compared}, "null-metanet": [],
                      "best classic": [], "l2/global": [], "sparse-learning": []}
            for budget in budgets:
                table = row_means(runs, speedup, budget)
                best = best_classic(runs, speedup, budget)
                for label in series:
                    entry = table.get(best if label == "best classic" else label)
                    series[label].append(entry)
            for label, entries in series.items():
                points = [(b, e) for b, e in zip(budgets, entries) if e is not None]
                if points:
                    axis.errorbar([b for b, _ in points], [100 * e[0] for _, e in points],
                                  yerr=[100 * e[1] for _, e in points], marker="o",
                                  capsize=3, label=label)
            axis.set_title(f"{speedup:g}× fewer MACs")
            axis.set_xlabel("fine-tune budget (epochs = equal optimiser steps)")
            axis.set_xticks(budgets)
            axis.set_ylabel("test accuracy (%)")
            axis.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
    return path


QUICK_NOTE = ("`--quick`: a subset of the full benchmark (2 held-out models per family, "
              "speed-ups 3× and 4× only, criteria l1, l2 and taylor with both allocations, "
              "3 seeds, budgets 0, 1 and 4); its figures are noisier than the full run's.")


def _split_note(runs) -> str:
    """The epochs spent before pruning by each metanet-path row, as the run log records them."""
    spent = {}
    for run in runs:
        if "epochs_after_metanet" in run:
            spent.setdefault(run["method"], set()).add((run["budget"], run["epochs_after_metanet"]))
    return "".join(
        f"; `{method}` spent " + ", ".join(f"{before} of {budget}" for budget, before in
                                          sorted(pairs)) + " epochs before pruning"
        for method, pairs in sorted(spent.items()))


def write_page(path: Path, records, *, models, checkpoint, settings, command, folders,
               seconds, notes: str | None = None) -> str:
    """Writes the Markdown page and its PNG (`notes`: Markdown added as a last section);
    returns the page's text."""
    runs = [r for r in records if r["kind"] == "run"]
    guards = [r for r in records if r["kind"] == "guard"]
    skipped = [r for r in records if r["kind"] == "skipped"]
    name, sha = checkpoint
    path.parent.mkdir(parents=True, exist_ok=True)
    png = plot(path.with_suffix(".png"), runs, settings) if runs else None
    families = {}
    for meta in models:
        families.setdefault(meta["family"], []).append(meta)
    lines = [
        "# Metanetwork vs its fallback, on held-out models",
        "",
        f"Command: `{command}` (written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{seconds / 60:.1f} min in this invocation; runs found in the run log are reused). "
        "Machine: 2 CPU cores shared with other jobs, run under `nice`, one torch thread; "
        "accuracies do not depend on the load, timings are not reported.",
        "",
        f"Checkpoint: {name}, sha256 {sha}. Held-out models: {len(models)} from "
        + ", ".join(f"`{folder.name}`" for folder in folders)
        + " (corpus splits with their own corpus seed: never used to train or select a "
        "checkpoint), "
        + ", ".join(f"{family} {len(metas)}" for family, metas in sorted(families.items()))
        + f"; seeds {settings['seeds']}; budgets {settings['budgets']} epochs "
        "(a budget is a number of optimiser steps on the model's data, equal for every row; "
        "the metanet rows split it as `prune()` does by default: all of it after pruning, "
        "as for every other row"
        + _split_note(runs) + "); speed-ups " + ", ".join(f"{s:g}×" for s in settings["speedups"]) + ".",
        "",
        *([QUICK_NOTE, ""] if settings.get("quick") else []),
        "Rows: `metanet` = `prune(method=\"metanet\")`, which chooses per model among "
        "candidate policies — uniform allocation, the sparsity head's policy blended with it, "
        "and the allocation measured on the model itself (each channel group alone pruned by "
        "a few fractions, its loss increase read on training batches; `metaprune.pruning."
        "damage`) — by the pruned model's loss on training batches after BatchNorm "
        "recalibration (forward passes only: no optimiser step, so the budget is unchanged; "
        "never the test data; report key `metanet.allocation_choice`; see "
        "`metaprune.pruning.metanet_choice`); `null-metanet` = the same path with an "
        "exact-identity metanetwork and no sparsity head: the same budget split and the same "
        "choice among the non-learned candidates only (uniform and measured), i.e. the metanet "
        "path with nothing learned, so `metanet − null metanet` is what the head adds; "
        "`CRITERION/ALLOCATION` = a classic criterion, all the budget after "
        "pruning; `sparse-learning` = torch-pruning's group sparse-learning penalty "
        "(reg 5e-4, α 16) for half the budget, group-L2 global prune, the rest (at budgets 0 "
        "and 1 it is the group-L2 prune). \"Best classic\" is the single best classic row over "
        "all models per speed-up and budget, chosen on these data (it favours the baseline).",
        "",
        "## Goals",
        "",
        *_goal_lines(runs, settings),
        "",
        "## Rewrite alone (dense accuracy, before any fine-tuning, BatchNorm statistics as the "
        "rewrite leaves them)",
        "",
        *_guard_lines(guards),
        "",
        *(["The compared checkpoint's rewrite alone:", "",
           *_guard_lines([r for r in records if r["kind"] == "guard-also"]), ""]
          if any(r["kind"] == "guard-also" for r in records) else []),
        "## Tables",
        "",
        *_tables(runs, settings),
    ]
    if png is not None:
        lines += [f"![accuracy against budget]({png.name})", ""]
    lines += _choice_lines(runs, settings)
    if skipped:
        lines += ["## Skipped runs", ""]
        reasons = {}
        for record in skipped:
            reasons.setdefault((record["model"], record["speedup"], record["method"]),
                               record["reason"])
        lines += [f"- {model} {speedup:g}× {method}: {reason}"
                  for (model, speedup, method), reason in sorted(reasons.items())]
        lines.append("")
    if notes:
        lines += ["## Notes", "", notes.strip(), ""]
    text = "\n".join(lines)
    path.write_text(text + "\n")
    return text
