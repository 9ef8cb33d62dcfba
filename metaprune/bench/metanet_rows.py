"""The rows of `metaprune bench metanet`: every method as (model, speed-up, budget, seed) -> accuracy.

A *budget* is a number of fine-tune epochs on the target model's training data, the same
loader (batch size, drop-last) for every row, so equal epochs are equal optimiser steps. Each
row spends exactly ``budget * steps_per_epoch`` optimiser steps, wherever it spends them:

- ``metanet``: `prune(method="metanet")` as a user calls it (rewrite, prune, the whole budget
  after pruning, the engine's default split; the allocation chosen per model among the
  sparsity head's and the measured candidates, `metanet_choice`).
- ``null-metanet``: the same call with `NullMetanet`, an exact identity with an untrained head:
  the metanet path without anything learned (the same split, and the same per-model choice
  among the non-learned candidates only: uniform and the measured allocation,
  `metanet_choice`).
- ``CRITERION/ALLOCATION``: a classic criterion with global or uniform allocation, pruned once
  per (model, speed-up) and fine-tuned for the whole budget after pruning.
- ``sparse-learning``: DepGraph-style sparse learning (torch-pruning's `GroupNormPruner`
  penalty) for ``budget // 2`` epochs, a group-L2 global prune, the rest of the budget; at a
  budget of 0 or 1 it is the plain group-L2 prune (no regularised step fits the split).

Budget 0 means BatchNorm recalibration only (forward passes, no optimiser step).

Example::

    from metaprune.bench.metanet_rows import ClassicPrunes, metanet_accuracy
    prunes = ClassicPrunes(model, example_inputs, loaders, speedup=2.0)
    accuracy = prunes.accuracy("l2", "global", budget=1, seed=0, loaders=fresh_loaders)
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from metaprune.errors import MetaPruneError
from metaprune.finetune import FinetuneConfig, evaluate, train
from metaprune.pruning import prune

# The engine's accuracy before/after and BN recalibration are done here, per budget.
NO_FINETUNE = {"bn_recalibration": False}
# torch-pruning's sparse-learning settings as DepGraph's reference scripts use them:
# group-L2 importance, penalty weight 5e-4, scaled per group by up to 2^4 for weak channels.
SPARSE_REG = 5e-4
SPARSE_ALPHA = 2 ** 4


def _skip_latency() -> dict:
    """`latency=False` where the engine knows it (issue 10's option): the bench never times."""
    return {"latency": False} if "latency" in inspect.signature(prune).parameters else {}


class NullMetanet:
    """A metanetwork that changes nothing: the rewrite is an exact copy, the head is untrained.

    `prune(method="metanet", metanet=NullMetanet())` runs the metanetwork path (budget split,
    the choice among uniform and measured allocations; global allocation without data) with
    nothing learned in it, so a benchmark can tell the method from the split and from the
    measurement. Example::

        prune(model, inputs, method="metanet", metanet=NullMetanet(), data=loaders,
              speedup=2.0, finetune_epochs=4)     # choice, l2 prune, 4 epochs
    """

    head_trained = False  # the engine never asks the head: non-learned candidates only
    rewrites_weights = False  # `transform` is a copy

    def transform(self, module: nn.Module, example_inputs) -> nn.Module:
        return copy.deepcopy(module)

    def layer_keep_ratios(self, module, example_inputs, *, speedup=None, params_ratio=None):
        raise MetaPruneError("the null metanetwork has no sparsity head")


def finetuned_accuracy(pruned: nn.Module, loaders, *, budget: int, seed: int) -> float:
    """Test accuracy of a copy of `pruned` after `budget` epochs (0: BN recalibration only).

    The same settings as `prune(finetune_epochs=budget, finetune={"seed": seed})` uses.
    """
    model = copy.deepcopy(pruned)
    train(model, loaders[0], epochs=budget, config=FinetuneConfig(seed=seed), progress=False)
    return float(evaluate(model, loaders[1]))


class ClassicPrunes:
    """Classic-criterion prunes of one model to one speed-up, each computed once and reused.

    Pruning is deterministic for a criterion and allocation (gradient criteria read the
    first batches of `loaders`, a loader seeded the same every time), so every budget and seed
    fine-tunes a copy of the same pruned model.

    Args:
        model, example_inputs: the dense held-out model.
        loaders: (train, test) loaders used to score gradient criteria (taylor, hessian).
        speedup: the MACs speed-up every prune reaches (within the engine's 2 %).
    """

    def __init__(self, model: nn.Module, example_inputs, loaders, *, speedup: float):
        self.model = model
        self.example_inputs = example_inputs
        self.loaders = loaders
        self.speedup = speedup
        self._pruned: dict[tuple[str, str], tuple[nn.Module, float] | MetaPruneError] = {}

    def pruned(self, criterion: str, allocation: str) -> tuple[nn.Module, float]:
        """(pruned model, achieved speed-up); raises the engine's error if it cannot prune."""
        key = (criterion, allocation)
        if key not in self._pruned:
            try:
                result = prune(self.model, self.example_inputs, method=criterion,
                               allocation=allocation, speedup=self.speedup, data=self.loaders,
                               finetune_epochs=0, finetune=NO_FINETUNE, **_skip_latency())
                self._pruned[key] = (result.model, float(result.report["speedup"]))
            except MetaPruneError as error:  # e.g. bn_scale on a model without norm layers
                self._pruned[key] = error
        found = self._pruned[key]
        if isinstance(found, MetaPruneError):
            raise found
        return found


def metanet_run(model, example_inputs, metanet, loaders, *, speedup: float, budget: int,
                seed: int, after_metanet: int | None = None) -> tuple[float, float, str | None]:
    """(accuracy, achieved speed-up, the allocation candidate `metanet_choice` chose or None)
    of `prune(method="metanet")` with `metanet`; an error if the engine did not spend the
    whole budget or (given) not `after_metanet` epochs before pruning."""
    result = prune(model, example_inputs, method="metanet", metanet=metanet, speedup=speedup,
                   data=loaders, finetune_epochs=budget, finetune={"seed": seed},
                   **_skip_latency())
    spent = result.report["finetune"] or {}
    epochs = spent.get("epochs_after_metanet", 0) + spent.get("epochs_after_prune", 0)
    if epochs != budget:  # the comparison is only fair if the engine spent the whole budget
        raise MetaPruneError(f"the metanet path spent {epochs} epochs, not the budget {budget}")
    before = spent.get("epochs_after_metanet", 0)
    if after_metanet is not None and before != after_metanet:
        raise MetaPruneError(f"the metanet path spent {before} epochs before pruning, "
                             f"not {after_metanet}")
    choice = ((result.report.get("metanet") or {}).get("allocation_choice") or {})
    return (float(result.report["accuracy_after"]), float(result.report["speedup"]),
            choice.get("candidate"))


def metanet_accuracy(model, example_inputs, metanet, loaders, **run) -> tuple[float, float]:
    """(accuracy, achieved speed-up) of `metanet_run` (same arguments)."""
    accuracy, achieved, _ = metanet_run(model, example_inputs, metanet, loaders, **run)
    return accuracy, achieved


def _protected_layers(model: nn.Module, example_inputs) -> list[nn.Module]:
    """Layers whose outputs are the model's outputs: never regularised (never pruned)."""
    from metaprune.pruning.groups import build_dependency_graph, output_layers

    return list(output_layers(build_dependency_graph(model, example_inputs)))


def sparse_learning(model: nn.Module, example_inputs, loaders, *, epochs: int, seed: int,
                    reg: float = SPARSE_REG) -> nn.Module:
    """A copy of `model` trained `epochs` epochs with torch-pruning's group sparse-learning penalty.

    The task loss is the fine-tune loop's (SGD, cosine, the same seed); after each backward
    pass `GroupNormPruner.regularize` adds ``reg * alpha^((max - imp) / (max - imp_min)) * w``
    to the gradient of every channel group, pushing weak groups towards zero before a group-L2
    prune. This is DepGraph's sparse-learning stage, counted against the same budget.
    """
    import torch.nn.functional as F
    import torch_pruning as tp

    from metaprune.seeding import seed_everything

    sparse = copy.deepcopy(model)
    if epochs == 0:
        return sparse
    pruner = tp.pruner.GroupNormPruner(
        sparse, example_inputs=tuple(example_inputs),
        importance=tp.importance.GroupMagnitudeImportance(p=2, normalizer="max"),
        reg=reg, ignored_layers=_protected_layers(sparse, example_inputs))
    config = FinetuneConfig(seed=seed)
    seed_everything(seed)
    optimizer = torch.optim.SGD(sparse.parameters(), lr=config.learning_rate(),
                                momentum=config.momentum, weight_decay=config.decay(),
                                nesterov=True)
    steps = epochs * len(loaders[0])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    sparse.train()
    for _ in range(epochs):
        for inputs, labels in loaders[0]:
            loss = F.cross_entropy(sparse(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            pruner.regularize(sparse, alpha=SPARSE_ALPHA)
            optimizer.step()
            schedule.step()
    return sparse.eval()


def sparse_learning_accuracy(model, example_inputs, loaders, *, speedup: float, budget: int,
                             seed: int, classic: ClassicPrunes) -> tuple[float, float]:
    """(accuracy, achieved speed-up): sparse learning, group-L2 global prune, fine-tune."""
    regularised = budget // 2
    if regularised == 0:  # nothing to regularise: the plain group-L2 prune, already computed
        pruned, achieved = classic.pruned("l2", "global")
    else:
        sparse = sparse_learning(model, example_inputs, loaders, epochs=regularised, seed=seed)
        result = prune(sparse, example_inputs, method="l2", allocation="global", speedup=speedup,
                       data=loaders, finetune_epochs=0, finetune=NO_FINETUNE, **_skip_latency())
        pruned, achieved = result.model, float(result.report["speedup"])
    return finetuned_accuracy(pruned, loaders, budget=budget - regularised, seed=seed), achieved
