"""Sparsity-head labels from MEASURED per-group damage (`metaprune metanet damage-labels`).

The tuned-policy labels (`policy_labels`) are the winners of short, noisy random searches. These
labels are measured instead: for every corpus TRAINING model and every prunable channel group,
the group alone is pruned by a few fractions of its channels (the engine's own `prune`, with a
policy naming only that group and the engine's criterion), BatchNorm statistics are re-estimated
on 8 training batches and the cross-entropy is read on 4 others (`metanet_choice`'s forward-only
protocol). The loss increase over the dense model, recalibrated the same way, is that group's
damage at that fraction; the MACs it saves come from the pruned model's report.

A label's policy is the allocation that removes the target's share of MACs at the least summed
damage (`damage_policy`: greedy on the lower convex hull of every group's damage-per-MAC curve,
treating groups as independent). The files have the tuned labels' format, so
`metaprune metanet train-head --labels DIR` trains the head on them unchanged; each also holds
the measurement (``damage``) and its share of the measuring time (``search_seconds``).

Example::

    from metaprune.training.damage_labels import DamageSettings, build_damage_labels

    summary = build_damage_labels(DamageSettings(corpus="/work/corpus", out_dir="labels",
                                                 speedups=(2.0, 3.0, 4.0)))
    summary["written"], summary["seconds"]          # (72, 410.3)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from metaprune.errors import InvalidTargetError, MetaPruneError

from .corpus import print_line
from .corpus_store import write_atomically
from .metatrain_tasks import CorpusTasks
from .policy_labels import LABEL_FORMAT, label_name, select_models

DAMAGE_SOURCE = "measured-damage/1"  # names how a label was made, beside the common format


@dataclass
class DamageSettings:
    """Which damage labels to build; JSON-serialisable.

    Example::

        DamageSettings(corpus="/work/corpus", out_dir="labels", fractions=(0.25, 0.5, 0.75))
    """

    corpus: str  # the corpus folder (only its training models are measured)
    out_dir: str  # one MODEL@Sx.json per (model, speed-up)
    speedups: tuple = (2.0, 3.0, 4.0)  # MACs speed-ups to write an allocation for
    fractions: tuple = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)  # channels removed, per try
    criterion: str = "l2"  # which channels a fraction removes (the metanet path's criterion)
    max_models: int | None = None  # measure at most this many models (None: all)

    def __post_init__(self) -> None:
        self.speedups = tuple(float(s) for s in self.speedups)
        self.fractions = tuple(sorted(float(f) for f in self.fractions))
        if not self.speedups or any(not s > 1.0 for s in self.speedups):
            raise InvalidTargetError(f"speed-ups must be numbers above 1, got {self.speedups}")
        if not self.fractions or any(not 0.0 < f < 1.0 for f in self.fractions):
            raise InvalidTargetError(f"fractions must lie in (0, 1), got {self.fractions}")


def measure_group_damage(model, example_inputs, loader, *, fractions=(0.25, 0.5, 0.75),
                         criterion: str = "l2") -> dict:
    """Loss increase and MACs saved when each prunable group alone loses each fraction.

    Args:
        model: the dense model (not modified).
        example_inputs: its example inputs.
        loader: training batches ``(inputs, labels)``; 12 are read, its shuffling is kept.
        fractions: shares of a group's channels to remove, one try each.
        criterion: the criterion ordering a group's channels (as `prune(method=...)`).

    Returns ``{"dense_loss", "macs", "groups": [{"root", "size", "fraction", "damage",
    "macs_saved"}]}``: per group, the fractions the engine could reach (its floors and channel
    steps may merge two), the loss increase (clamped at 0, non-decreasing) and MACs saved.
    """
    import copy

    from metaprune.pruning import prune
    from metaprune.pruning.graph_groups import plan_channel_groups
    from metaprune.pruning.metanet_choice import calibration_and_scoring, recalibrated_loss

    calibration, scoring = calibration_and_scoring(loader)
    with torch.no_grad():
        dense_loss = recalibrated_loss(copy.deepcopy(model), calibration, scoring)
    _, groups = plan_channel_groups(copy.deepcopy(model), example_inputs)
    macs = None
    measured = []
    for group in groups:
        if group.blocked:
            continue
        curve = {"root": group.root, "size": group.size, "fraction": [], "damage": [],
                 "macs_saved": []}
        for fraction in fractions:
            try:
                result = prune(model, example_inputs, method=criterion,
                               policy={group.root: 1.0 - fraction}, latency=False)
            except MetaPruneError:
                continue  # e.g. a group whose removal the engine refuses: left unmeasured
            report = result.report
            macs = report["macs_before"]
            saved = macs - report["macs_after"]
            if saved <= (curve["macs_saved"][-1] if curve["macs_saved"] else 0):
                continue  # no channel removed, or the floor / step gave the same widths again
            with torch.no_grad():
                loss = recalibrated_loss(result.model, calibration, scoring)
            damage = max(loss - dense_loss, 0.0, curve["damage"][-1] if curve["damage"] else 0.0)
            curve["fraction"].append(fraction)
            curve["damage"].append(damage)
            curve["macs_saved"].append(float(saved))
        if curve["fraction"]:
            measured.append(curve)
    return {"dense_loss": dense_loss, "macs": macs, "groups": measured}


def damage_policy(measurement: dict, speedup: float) -> dict[str, float]:
    """Group root -> keep ratio: the measured allocation removing ``1 - 1/speedup`` of the MACs
    at the least summed damage, groups taken as independent.

    Greedy on marginal damage per MAC saved, each step jumping a group to whichever of its
    further measured fractions has the lowest ratio (the lower convex hull, so a curve that is
    flat after a steep start is not skipped). Groups never chosen keep 1.0.

    Example::

        measurement = {"macs": 100, "groups": [
            {"root": "a", "fraction": [0.5], "damage": [0.1], "macs_saved": [40.0]},
            {"root": "b", "fraction": [0.5], "damage": [0.9], "macs_saved": [40.0]}]}
        damage_policy(measurement, 1.5)   # {'a': 0.5, 'b': 1.0}
    """
    groups = measurement["groups"]
    goal = (1.0 - 1.0 / speedup) * float(measurement["macs"] or 0.0)
    state = [-1] * len(groups)  # index of each group's chosen fraction (-1: none removed)

    def level(g: int, i: int) -> tuple[float, float]:
        curve = groups[g]
        return (0.0, 0.0) if i < 0 else (curve["damage"][i], curve["macs_saved"][i])

    saved = 0.0
    while saved < goal:
        best = None
        for g, curve in enumerate(groups):
            damage_now, saved_now = level(g, state[g])
            for j in range(state[g] + 1, len(curve["fraction"])):
                gain = curve["macs_saved"][j] - saved_now
                if gain <= 0:
                    continue
                ratio = (curve["damage"][j] - damage_now) / gain
                if best is None or ratio < best[0]:
                    best = (ratio, g, j)
        if best is None:
            break  # every group at its deepest measured fraction
        _, g, j = best
        saved += groups[g]["macs_saved"][j] - level(g, state[g])[1]
        state[g] = j
    return {curve["root"]: 1.0 if i < 0 else 1.0 - curve["fraction"][i]
            for curve, i in zip(groups, state)}


def damage_label(model_id: str, meta: dict, speedup: float, measurement: dict,
                 seconds: float, settings: DamageSettings) -> dict:
    """One label in `policy_labels`' format (``policy`` is the measured allocation)."""
    return {
        "format": LABEL_FORMAT, "source": DAMAGE_SOURCE,
        "model": model_id, "dataset": meta["dataset"], "family": meta["family"],
        "speedup": float(speedup), "policy": damage_policy(measurement, speedup),
        "accuracy": None, "accuracy_before": None, "trials": [],
        "criterion": settings.criterion, "damage": measurement,
        "search_seconds": round(seconds, 2),
    }


def build_damage_labels(settings: DamageSettings, *,
                        log: Callable[[str], None] | None = None) -> dict:
    """Measure every missing training model and write its labels; returns a summary.

    Returns ``{"written", "skipped", "seconds", "labels"}``. A model whose labels all exist is
    skipped, so an interrupted run resumes.
    """
    log = log or print_line
    started = time.perf_counter()
    tasks = CorpusTasks(settings.corpus)
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "settings.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    models = select_models(tasks, settings.max_models)
    written = skipped = 0
    for index, model_id in enumerate(models, 1):
        paths = [out_dir / label_name(model_id, s) for s in settings.speedups]
        if all(path.is_file() for path in paths):
            skipped += len(paths)
            continue
        measuring = time.perf_counter()
        model, example_inputs = tasks.model(model_id)
        measurement = measure_group_damage(model, example_inputs, tasks.loaders(model_id)[0],
                                           fractions=settings.fractions,
                                           criterion=settings.criterion)
        seconds = time.perf_counter() - measuring
        if not measurement["groups"]:
            log(f"[{index}/{len(models)}] {model_id}: no prunable group, no label")
            continue
        for speedup, path in zip(settings.speedups, paths):
            # one measurement serves every speed-up: each label carries its share of the time,
            # so summed over labels (as `train_head` reports it) it is the measuring time
            document = damage_label(model_id, tasks.meta[model_id], speedup, measurement,
                                    seconds / len(paths), settings)
            write_atomically(path, (json.dumps(document, indent=1) + "\n").encode())
            written += 1
        log(f"[{index}/{len(models)}] {model_id}: {len(measurement['groups'])} groups, "
            f"dense loss {measurement['dense_loss']:.4f}, {seconds:.1f} s")
    return {"written": written, "skipped": skipped,
            "seconds": round(time.perf_counter() - started, 1),
            "labels": sorted(str(p) for p in out_dir.glob("*@*x.json"))}

