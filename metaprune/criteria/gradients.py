"""Gradient statistics for the data-driven criteria (first-order Taylor, OBD Hessian).

Torch-Pruning's `GroupHessianImportance.accumulate_grad` looks parameters up by name but stores
them by tensor, so its running sums restart at every call and only the last batch counts. We
keep our own running sums, keyed by parameter name, and hand the averages to the scorers.
"""

from collections.abc import Callable, Iterable

import torch
from torch import nn

from metaprune.errors import MetaPruneError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GradientStatistics:
    """Running mean of gradients and of squared gradients, per parameter name.

    Each `accumulate(model)` call adds the current `.grad` of every parameter as one sample.
    Taylor importance uses `mean_gradient`; the diagonal empirical Fisher that OBD uses as its
    Hessian estimate is `mean_squared_gradient` over per-sample gradients.

    Example::

        stats = GradientStatistics()
        for inputs, labels in batches:
            model.zero_grad()
            loss_fn(model(inputs), labels).backward()
            stats.accumulate(model)
        fisher = stats.mean_squared_gradient("conv1.weight")
    """

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self._sum_of_squares: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}

    def accumulate(self, model: nn.Module) -> None:
        """Adds the gradients currently stored on `model`'s parameters as one sample."""
        for name, parameter in model.named_parameters():
            if parameter.grad is None:
                continue
            grad = parameter.grad.detach()
            if name in self._sum:
                self._sum[name] += grad
                self._sum_of_squares[name] += grad.pow(2)
                self._count[name] += 1
            else:
                self._sum[name] = grad.clone()
                self._sum_of_squares[name] = grad.pow(2)
                self._count[name] = 1

    def samples(self, name: str) -> int:
        """How many gradients were accumulated for parameter `name`."""
        return self._count.get(name, 0)

    def mean_gradient(self, name: str) -> torch.Tensor | None:
        if name not in self._sum:
            return None
        return self._sum[name] / self._count[name]

    def mean_squared_gradient(self, name: str) -> torch.Tensor | None:
        if name not in self._sum_of_squares:
            return None
        return self._sum_of_squares[name] / self._count[name]


def collect_gradient_statistics(
    model: nn.Module,
    batches: Iterable,
    *,
    loss_fn: LossFn | None = None,
    max_batches: int = 4,
    per_sample: bool = False,
    max_samples_per_batch: int = 16,
) -> GradientStatistics:
    """Runs forward/backward passes over up to `max_batches` batches of `(inputs, labels)`.

    Args:
        model: the network; it is put in eval mode so batch statistics stay fixed.
        batches: an iterable of `(inputs, labels)` pairs (e.g. a DataLoader).
        loss_fn: maps (outputs, labels) to a scalar; cross-entropy by default.
        max_batches: how many batches to read.
        per_sample: one gradient sample per example (what OBD's Fisher needs) instead of one
            per batch mean loss (what first-order Taylor needs).
        max_samples_per_batch: with `per_sample`, the examples taken from each batch (each is
            one backward pass, so this bounds the cost).
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    stats = GradientStatistics()
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for inputs, labels in batches:
            if seen >= max_batches:
                break
            seen += 1
            if per_sample:
                for row in range(min(len(labels), max_samples_per_batch)):
                    model.zero_grad(set_to_none=True)
                    loss_fn(model(inputs[row : row + 1]), labels[row : row + 1]).backward()
                    stats.accumulate(model)
            else:
                model.zero_grad(set_to_none=True)
                loss_fn(model(inputs), labels).backward()
                stats.accumulate(model)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if seen == 0:
        raise MetaPruneError("the data given for a gradient criterion yielded no batches")
    return stats
