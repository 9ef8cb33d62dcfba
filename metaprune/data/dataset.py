"""The in-memory dataset every part of MetaPrune trains and evaluates on."""

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from metaprune.data.errors import DatasetFormatError
from metaprune.data.npz import Splits


@dataclass
class Dataset:
    """A classification dataset held as tensors, split into train and test.

    Inputs are float32 and already normalised (``(raw / scale - mean) / std`` per channel for the
    built-in datasets; as given for an ``.npz`` upload), labels are int64 class indices.

    Example::

        from metaprune.data import load_dataset
        data = load_dataset("digits")
        data.input_shape                     # (1, 8, 8)
        train, test = data.loaders(batch_size=64, seed=0, train_subset=500)
        (x,) = data.example_inputs()        # one real sample, shape (1, 1, 8, 8)
    """

    name: str  # dataset id, or the file/folder stem it was read from
    x_train: torch.Tensor  # (N_train, *input_shape) float32, normalised
    y_train: torch.Tensor  # (N_train,) int64
    x_test: torch.Tensor  # (N_test, *input_shape) float32, normalised
    y_test: torch.Tensor  # (N_test,) int64
    input_shape: tuple[int, ...]  # per sample, channel first, e.g. (1, 28, 28)
    num_classes: int  # labels lie in [0, num_classes)
    mean: tuple[float, ...]  # per-channel mean subtracted (in units of raw / scale)
    std: tuple[float, ...]  # per-channel std divided by (same units)

    def loaders(
        self, batch_size: int = 128, *, seed: int = 0, train_subset: int | None = None
    ) -> tuple[DataLoader, DataLoader]:
        """Return ``(train_loader, test_loader)`` yielding ``(inputs, labels)`` batches.

        The train loader reshuffles every epoch from a generator seeded with ``seed``, so two
        runs with the same seed see the same batches. ``train_subset=N`` keeps the first ``N``
        samples of a permutation seeded with ``seed`` (all samples if ``N`` exceeds the set), for
        quick runs. The last incomplete train batch is dropped (a batch of one sample would
        break BatchNorm); the test loader is in order and complete.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        x_train, y_train = self.x_train, self.y_train
        if train_subset is not None:
            if train_subset < 1:
                raise ValueError(f"train_subset must be positive, got {train_subset}")
            generator = torch.Generator().manual_seed(seed)
            keep = torch.randperm(len(x_train), generator=generator)[:train_subset]
            x_train, y_train = x_train[keep], y_train[keep]
        shuffle = torch.Generator().manual_seed(seed)
        train = _batched_loader(
            TensorDataset(x_train, y_train),
            RandomSampler(range(len(x_train)), generator=shuffle),
            batch_size,
            drop_last=len(x_train) > batch_size,
        )
        test = _batched_loader(
            TensorDataset(self.x_test, self.y_test),
            SequentialSampler(range(len(self.x_test))),
            batch_size,
            drop_last=False,
        )
        return train, test

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor]:
        """Real test samples shaped ``(batch, *input_shape)``, as a tuple for tracing/export."""
        if not 1 <= batch <= len(self.x_test):
            raise ValueError(f"batch must lie in [1, {len(self.x_test)}], got {batch}")
        return (self.x_test[:batch].clone(),)

    @classmethod
    def from_splits(
        cls,
        name: str,
        splits: Splits,
        *,
        scale: float | None = None,
        num_classes: int | None = None,
    ) -> "Dataset":
        """Build a dataset from raw arrays.

        ``scale=None`` keeps the inputs as given (an upload is in whatever units its model
        expects; mean 0, std 1 are recorded). A number divides the raw values by ``scale`` and
        then standardises each channel with the training set's mean and std.
        """
        x_train = _as_float_tensor(splits.x_train, f"{name}: x_train")
        x_test = _as_float_tensor(splits.x_test, f"{name}: x_test")
        input_shape = tuple(x_train.shape[1:])
        channels = input_shape[0] if len(input_shape) >= 2 else 1
        if scale is None:
            mean, std = (0.0,) * channels, (1.0,) * channels
        else:
            x_train, x_test = x_train / scale, x_test / scale
            mean, std = _channel_statistics(x_train, channels)
            x_train, x_test = _standardise(x_train, mean, std), _standardise(x_test, mean, std)
        y_train = torch.from_numpy(splits.y_train.astype(np.int64))
        y_test = torch.from_numpy(splits.y_test.astype(np.int64))
        largest_label = int(max(y_train.max(), y_test.max()))
        if num_classes is None:
            num_classes = largest_label + 1
        elif largest_label >= num_classes:
            raise DatasetFormatError(f"{name}: label {largest_label} >= {num_classes} classes")
        return cls(name, x_train, y_train, x_test, y_test, input_shape, num_classes, mean, std)


def _batched_loader(dataset: TensorDataset, order, batch_size: int, *, drop_last: bool):
    # The sampler yields whole index batches and `batch_size=None` turns off per-sample
    # collation: one tensor gather per batch instead of batch_size Python-level lookups.
    return DataLoader(
        dataset, sampler=BatchSampler(order, batch_size, drop_last=drop_last), batch_size=None
    )


def _as_float_tensor(array: np.ndarray, where: str) -> torch.Tensor:
    # float64 values beyond float32's range become inf in the cast; the check below reports them.
    with np.errstate(over="ignore", invalid="ignore"):
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    # Integers (even int64) always land on finite float32 values: only floats need the check.
    if array.dtype.kind == "f" and not torch.isfinite(tensor).all():
        raise DatasetFormatError(f"{where} has values that are NaN or overflow float32")
    return tensor


def _channel_statistics(
    x: torch.Tensor, channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # torch's reductions sum pairwise, so float32 stays accurate to ~1e-6 over millions of
    # values without a float64 copy of the whole set.
    var, mean = torch.var_mean(x.reshape(len(x), channels, -1), dim=(0, 2))
    std = var.sqrt().clamp_min(1e-8)  # a constant channel stays finite
    return tuple(mean.tolist()), tuple(std.tolist())


def _standardise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x - mean) / std`` per channel, in place (``x`` is a fresh tensor owned by the caller)."""
    view = (1, len(mean)) + (1,) * (x.dim() - 2)
    mean_t = torch.tensor(mean, dtype=x.dtype).reshape(view)
    std_t = torch.tensor(std, dtype=x.dtype).reshape(view)
    return x.sub_(mean_t).div_(std_t)
