"""Checkpoint selection on a validation split of models and of their data, by the bench protocol.

Three corpus splits keep selection apart from reporting: meta-training uses the training
split; this module scores checkpoints on the *validation* split (its own corpus folder, models
no training used); `metaprune bench metanet` reports on the *held-out* split, which nothing
selects on. The data are split too: each validation model is fine-tuned on 80 % of its
dataset's training set and scored on the other 20 %, never on the test set.

The score of a checkpoint is the protocol of `metaprune bench metanet` at small budgets:
`prune(method="metanet")` at each speed-up and budget, mean accuracy over models and cells,
beside the null metanetwork's (the budget split alone) on the same cells.

Example::

    from metaprune.training.metanet_select import validation_score
    record = validation_score("run/checkpoints/epoch-002.safetensors", "corpus/validation")
    record["score"], record["null"]          # e.g. 0.61, 0.58
"""

from __future__ import annotations

import functools
import json
import statistics
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
from torch.utils.data import TensorDataset

from metaprune.bench.metanet_rows import NullMetanet, metanet_accuracy
from metaprune.data import load_dataset
from metaprune.errors import InvalidTargetError, MetaPruneError
from metaprune.formats import load_model
from metaprune.pruning.training_bridge import DATA_BATCH_SIZE

VALIDATION_FRACTION = 0.2  # of each dataset's training set, held back to score on
SPLIT_SEED = 20261203  # the data split is fixed: every checkpoint is scored on the same images
SPEEDUPS = (2.0, 3.0, 4.0)
BUDGETS = (0, 1)
GUARD = 0.01  # the rewrite alone may cost at most this much dense accuracy on any model


@functools.lru_cache(maxsize=4)
def _dataset(name: str):
    return load_dataset(name)


def validation_loaders(dataset: str, seed: int, *, train_subset: int | None = None):
    """(fit, score) loaders: 80 % of `dataset`'s training set to fine-tune on, 20 % to score.

    The split is fixed (`SPLIT_SEED`); `seed` only shuffles the fit loader. The test set is
    never touched.
    """
    data = _dataset(dataset)
    x, y = data.x_train, data.y_train
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    held = int(len(x) * VALIDATION_FRACTION)
    score_index, fit_index = order[:held], order[held:]
    if train_subset is not None:
        fit_index = fit_index[:train_subset]
    fit = TensorDataset(x[fit_index], y[fit_index])
    score = TensorDataset(x[score_index], y[score_index])
    shuffle = torch.Generator().manual_seed(seed)
    fit_loader = DataLoader(fit, batch_size=None, sampler=BatchSampler(
        RandomSampler(range(len(fit)), generator=shuffle), DATA_BATCH_SIZE, drop_last=True))
    score_loader = DataLoader(score, batch_size=None, sampler=BatchSampler(
        SequentialSampler(range(len(score))), DATA_BATCH_SIZE, drop_last=False))
    return fit_loader, score_loader


def _models(folder: Path) -> list[dict]:
    metas = [json.loads(path.read_text()) for path in sorted(folder.glob("*.meta.json"))]
    if not metas:
        raise InvalidTargetError(f"no corpus model in the validation folder {folder}")
    return metas


def _cells(metanet, folder: Path, speedups, budgets, seed: int) -> dict[str, float]:
    """'model|speedup|budget' -> accuracy of prune(method="metanet") on the score split."""
    cells = {}
    for meta in _models(folder):
        model, example_inputs = load_model(folder / meta["weights"])
        model.eval()
        for speedup in speedups:
            for budget in budgets:
                loaders = validation_loaders(meta["dataset"], seed,
                                             train_subset=meta.get("train_subset"))
                try:
                    accuracy, _ = metanet_accuracy(model, example_inputs, metanet, loaders,
                                                   speedup=speedup, budget=budget, seed=seed)
                except MetaPruneError:  # a target this model cannot reach: no cell
                    continue
                cells[f"{meta['model_id']}|{speedup:g}|{budget}"] = accuracy
    return cells


def dense_changes(metanet, folder: Path) -> dict[str, float]:
    """Model -> dense accuracy after the rewrite alone minus before, on the score split."""
    from metaprune.finetune import evaluate

    changes = {}
    for meta in _models(folder):
        model, example_inputs = load_model(folder / meta["weights"])
        model.eval()
        score = validation_loaders(meta["dataset"], 0)[1]
        rewritten = metanet.transform(model, example_inputs)
        changes[meta["model_id"]] = float(evaluate(rewritten, score) - evaluate(model, score))
    return changes


def validation_score(checkpoint, folder, *, speedups=SPEEDUPS, budgets=BUDGETS, seed: int = 0,
                     null_cells: dict[str, float] | None = None) -> dict:
    """Score of one checkpoint on the validation split, beside the null metanetwork's.

    Returns ``{"checkpoint", "score", "null", "gain", "guard", "passes_guard", "cells",
    "null_cells"}``: mean accuracy over the cells both reached, the null's mean on the same
    cells, their difference, and the worst dense-accuracy change of the rewrite alone (the
    guard: a checkpoint that costs more than `GUARD` on any validation model is not
    eligible). `null_cells` (from an earlier call) saves recomputing the null, which no
    checkpoint changes.
    """
    from metaprune.metanet import load_metanet

    folder = Path(folder)
    torch.set_num_threads(1)
    loaded = load_metanet(str(checkpoint))
    changes = dense_changes(loaded, folder)
    cells = _cells(loaded, folder, speedups, budgets, seed)
    null_cells = null_cells or _cells(NullMetanet(), folder, speedups, budgets, seed)
    shared = sorted(cells.keys() & null_cells.keys())
    if not shared:
        raise InvalidTargetError(f"no validation cell could be pruned in {folder}")
    score = statistics.fmean(cells[key] for key in shared)
    null = statistics.fmean(null_cells[key] for key in shared)
    guard = min(changes.values())
    return {"checkpoint": str(checkpoint), "score": score, "null": null, "gain": score - null,
            "guard": guard, "passes_guard": guard >= -GUARD, "dense_changes": changes,
            "cells": cells, "null_cells": null_cells}
