"""Sparsity-head labels from MEASURED per-group damage (`metaprune metanet damage-labels`).

The tuned-policy labels (`policy_labels`) are the winners of short, noisy random searches. These
labels are measured instead, by the library's `metaprune.pruning.damage` (the same measurement
`prune(method="metanet")` offers as a candidate): for every corpus TRAINING model and every
prunable channel group, the group alone is pruned by a few fractions of its channels (the
engine's plan and criterion order), BatchNorm statistics are re-estimated on 8 training batches
and the cross-entropy is read on 4 others. The loss increase over the dense model, recalibrated
the same way, is that group's damage at that fraction; the MACs it saves come from the engine's
cost model.

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

from metaprune.errors import InvalidTargetError
from metaprune.pruning.damage import damage_policy, measure_model_damage

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
        measurement = measure_model_damage(model, example_inputs, tasks.loaders(model_id)[0],
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

