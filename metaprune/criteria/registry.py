"""The classic importance criteria behind one interface.

A criterion scores the channels of one Torch-Pruning dependency group (a set of coupled
layers whose channels must be removed together) and returns one importance per channel of the
group's root layer, higher meaning "keep". Magnitude criteria reuse Torch-Pruning's scorers;
the gradient criteria first collect gradient statistics over a few batches.
"""

from collections.abc import Iterable

import torch
import torch_pruning as tp
from torch import nn

from metaprune.criteria.gradients import LossFn, collect_gradient_statistics
from metaprune.errors import InvalidTargetError, MetaPruneError
from metaprune.vocabulary import CRITERIA, DATA_FREE_CRITERIA  # noqa: F401  (the names, once)

NORMALIZERS = ("mean", "max", "none")


class Criterion:
    """Base class: `criterion(group)` gives per-channel importance of a dependency group.

    Subclasses that need data set `needs_data = True` and implement `prepare`, which the
    pruning engine calls once with the model to be pruned and some `(inputs, labels)` batches
    before any group is scored.

    Example::

        import torch_pruning as tp
        criterion = build_criterion("l2")
        DG = tp.DependencyGraph().build_dependency(model, example_inputs)
        for group in DG.get_all_groups():
            importance = criterion(group)  # shape: (channels of the group's root layer,)
    """

    name: str = ""
    needs_data: bool = False

    def prepare(self, model: nn.Module, batches: Iterable, loss_fn: LossFn | None = None) -> None:
        """Collects whatever the criterion needs from data; a no-op for data-free criteria."""

    def __call__(self, group) -> torch.Tensor | None:
        raise NotImplementedError


class TorchPruningCriterion(Criterion):
    """Wraps a `tp.importance` scorer whose `__call__(group)` is already correct.

    Args:
        name: the criterion id reported back.
        importance: the Torch-Pruning scorer.
        fallback: scorer used for groups the first one cannot see (e.g. `bn_scale` on a group
            without any normalisation layer scores that group by its weights' L1 norm).
    """

    def __init__(self, name: str, importance, fallback=None) -> None:
        self.name = name
        self._importance = importance
        self._fallback = fallback

    def __call__(self, group) -> torch.Tensor | None:
        scores = self._importance(group)
        if scores is None and self._fallback is not None:
            scores = self._fallback(group)
        return scores


class RandomCriterion(Criterion):
    """Uniform random importance from a seeded generator (a baseline that is reproducible).

    Args:
        seed: seed of the generator; the same seed and model give the same channels.
    """

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def __call__(self, group) -> torch.Tensor:
        _, root_idxs = group[0]
        return torch.rand(len(root_idxs), generator=self._generator)


class GradientCriterion(Criterion):
    """Taylor or OBD-Hessian importance from gradients averaged over several batches.

    `prepare` collects `GradientStatistics` and stores the statistic the scorer reads in each
    parameter's `.grad` (the mean gradient for Taylor; the mean squared per-sample gradient,
    i.e. the diagonal empirical Fisher, for Hessian). Parameters that got no gradient get zeros
    so every layer can be scored.

    Args:
        name: `"taylor"` or `"hessian"`.
        importance: the Torch-Pruning scorer that reads `.grad`.
        max_batches: batches read by `prepare`.
        max_samples_per_batch: per-sample backward passes per batch (Hessian only).
    """

    needs_data = True

    def __init__(self, name: str, importance, *, max_batches: int = 4,
                 max_samples_per_batch: int = 16) -> None:
        self.name = name
        self._importance = importance
        self._max_batches = max_batches
        self._max_samples_per_batch = max_samples_per_batch
        self._prepared = False

    def prepare(self, model: nn.Module, batches: Iterable, loss_fn: LossFn | None = None) -> None:
        per_sample = self.name == "hessian"
        stats = collect_gradient_statistics(
            model, batches, loss_fn=loss_fn, max_batches=self._max_batches,
            per_sample=per_sample, max_samples_per_batch=self._max_samples_per_batch,
        )
        for name, parameter in model.named_parameters():
            value = stats.mean_squared_gradient(name) if per_sample else stats.mean_gradient(name)
            parameter.grad = torch.zeros_like(parameter) if value is None else value.clone()
        self._prepared = True

    def __call__(self, group) -> torch.Tensor | None:
        if not self._prepared:
            raise MetaPruneError(
                f"criterion {self.name!r} needs gradient statistics: call prepare() with data first"
            )
        return self._importance(group)


def _normalizer(normalizer: str | None) -> str | None:
    if normalizer is None or normalizer == "none":
        return None
    if normalizer not in NORMALIZERS:
        raise InvalidTargetError(
            f"unknown normaliser {normalizer!r}; choose one of {', '.join(NORMALIZERS)}"
        )
    return normalizer


def build_criterion(name: str, *, normalizer: str | None = "mean", seed: int = 0,
                    max_batches: int = 4) -> Criterion:
    """Creates the criterion called `name` (one of `CRITERIA`).

    Args:
        name: criterion id.
        normalizer: how each group's scores are scaled before a global ranking compares groups:
            `"mean"` (score / group mean), `"max"`, or `"none"`. LAMP always uses its own.
        seed: seed of the `random` criterion.
        max_batches: batches the gradient criteria read.

    Example::

        criterion = build_criterion("taylor")
        criterion.prepare(model, train_loader)   # gradient criteria only
        importance = criterion(group)
    """
    norm = _normalizer(normalizer)
    if name == "l1":
        return TorchPruningCriterion(name, tp.importance.GroupMagnitudeImportance(p=1, normalizer=norm))
    if name == "l2":
        return TorchPruningCriterion(name, tp.importance.GroupMagnitudeImportance(p=2, normalizer=norm))
    if name == "bn_scale":
        norm_types = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
        scorer = tp.importance.GroupMagnitudeImportance(p=1, normalizer=norm, target_types=norm_types)
        return TorchPruningCriterion(
            name, scorer, fallback=tp.importance.GroupMagnitudeImportance(p=1, normalizer=norm)
        )
    if name == "lamp":
        return TorchPruningCriterion(name, tp.importance.LAMPImportance(p=2))
    if name == "fpgm":
        return TorchPruningCriterion(name, tp.importance.FPGMImportance(p=2, normalizer=norm))
    if name == "random":
        return RandomCriterion(seed)
    if name == "taylor":
        return GradientCriterion(name, tp.importance.GroupTaylorImportance(normalizer=norm),
                                 max_batches=max_batches)
    if name == "hessian":
        return GradientCriterion(name, tp.importance.GroupHessianImportance(normalizer=norm),
                                 max_batches=max_batches)
    raise InvalidTargetError(f"unknown criterion {name!r}; valid criteria: {', '.join(CRITERIA)}")
