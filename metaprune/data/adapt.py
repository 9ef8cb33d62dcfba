"""Fitting data samples to a model's input shape, by inserting or removing size-1 dimensions.

MNIST-1D's own examples feed a model ``[B, 40]`` while our dataset yields ``[B, 1, 40]`` (one
channel): the same numbers, an extra size-1 dimension. Such samples are reshaped to the model's
example-input shape, and the report says so. Any other mismatch (different sizes, different
order) is refused before any work, naming both shapes — never guessed at.

Example::

    adaptation((1, 40), (40,))      # 'samples [1, 40] reshaped to the model's [40] (size-1 ...'
    adaptation((1, 40), (1, 40))    # None: nothing to do
    adaptation((1, 40), (20, 2))    # DatasetShapeError naming both shapes
    loaders, note = adapt_loaders((train, test), (torch.randn(1, 40),))
"""

from collections.abc import Sequence

import torch

from metaprune.data.errors import DatasetRequestError


class DatasetShapeError(DatasetRequestError):
    """The data's samples do not fit the model's input, even up to size-1 dimensions."""


def _shown(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def adaptation(sample_shape: Sequence[int], model_shape: Sequence[int]) -> str | None:
    """None when the shapes are equal; a description of the reshape when they differ only by
    size-1 dimensions; otherwise DatasetShapeError. Both shapes are per sample (no batch)."""
    sample_shape, model_shape = tuple(sample_shape), tuple(model_shape)
    if sample_shape == model_shape:
        return None
    if [d for d in sample_shape if d != 1] != [d for d in model_shape if d != 1]:
        raise DatasetShapeError(
            f"the data's samples have shape {_shown(sample_shape)} but the model takes "
            f"{_shown(model_shape)} per sample (its example input without the batch "
            "dimension); only size-1 dimensions can be inserted or removed to fit them")
    change = "inserted" if len(model_shape) > len(sample_shape) else "removed"
    return (f"samples {_shown(sample_shape)} reshaped to the model's {_shown(model_shape)} "
            f"(size-1 dimensions {change})")


class ReshapedLoader:
    """A loader whose inputs are reshaped to ``(batch, *shape)``; everything else passes through.

    Args:
        loader: any iterable of ``(inputs, labels)`` batches with a length.
        shape: the per-sample shape the inputs get (same element count).
    """

    def __init__(self, loader, shape: Sequence[int]) -> None:
        self.loader = loader
        self.shape = tuple(shape)

    def __iter__(self):
        for inputs, labels in self.loader:
            yield inputs.reshape(inputs.shape[0], *self.shape), labels

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):  # batch_size, dataset, ... of the wrapped loader
        return getattr(self.loader, name)


def sample_shape(loader) -> tuple[int, ...]:
    """The per-sample input shape of a loader (from its dataset's first item when it has one,
    else from its first batch)."""
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__getitem__"):
        try:
            return tuple(dataset[0][0].shape)
        except (IndexError, TypeError, KeyError, AttributeError):
            pass
    inputs, _ = next(iter(loader))
    return tuple(inputs.shape[1:])


def adapt_loaders(loaders, example_inputs: Sequence[torch.Tensor]):
    """``((train, test), note)``: loaders whose inputs fit the model's single example input,
    and the reshape that made them fit (None when none was needed).

    A model with several inputs takes its loaders as they are.
    """
    if loaders is None or len(example_inputs) != 1:
        return loaders, None
    model_shape = tuple(example_inputs[0].shape[1:])
    note = None
    fitted = []
    for loader in loaders:
        shape = sample_shape(loader)
        loader_note = adaptation(shape, model_shape)
        note = note or loader_note
        fitted.append(loader if loader_note is None else ReshapedLoader(loader, model_shape))
    return tuple(fitted), note
