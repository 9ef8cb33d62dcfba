"""CIFAR-10 from the user's copy of the "python version" batches (no download).

A folder holding ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` (or its parent holding
``cifar-10-batches-py/``) is read with the restricted unpickler; ``metaprune data fetch cifar10
--from DIR`` converts it into the cache as an ``.npz``.
"""

from pathlib import Path

import numpy as np

from metaprune.data.errors import DatasetFormatError
from metaprune.data.npz import Splits
from metaprune.data.safe_pickle import load_restricted_pickle
from metaprune.data.source import DatasetSource
from metaprune.errors import DatasetUnavailableError

TRAIN_BATCHES = tuple(f"data_batch_{index}" for index in range(1, 6))
TEST_BATCH = "test_batch"
_PIXELS = 3 * 32 * 32


def find_batch_folder(folder: str | Path) -> Path | None:
    """The folder holding the batch files: ``folder`` itself or its ``cifar-10-batches-py``."""
    folder = Path(folder).expanduser()
    for candidate in (folder, folder / "cifar-10-batches-py"):
        if all((candidate / name).is_file() for name in (*TRAIN_BATCHES, TEST_BATCH)):
            return candidate
    return None


def build_cifar10(source: Path | None) -> Splits:
    """Read the six CIFAR-10 batch files under ``source`` into uint8 (N, 3, 32, 32) arrays."""
    folder = find_batch_folder(source) if source is not None else None
    if folder is None:
        raise DatasetUnavailableError(
            f"no CIFAR-10 python batches ({', '.join(TRAIN_BATCHES)}, {TEST_BATCH}) in {source}; "
            "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
            "unpack it and pass the folder"
        )
    train = [read_batch(folder / name) for name in TRAIN_BATCHES]
    x_test, y_test = read_batch(folder / TEST_BATCH)
    return Splits(
        x_train=np.concatenate([x for x, _ in train]),
        y_train=np.concatenate([y for _, y in train]),
        x_test=x_test,
        y_test=y_test,
    )


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 images (N, 3, 32, 32), int64 labels (N,)), strictly checked."""
    batch = load_restricted_pickle(path)
    if not isinstance(batch, dict):
        raise DatasetFormatError(
            f"{path.name}: a CIFAR-10 batch is a dict, got {type(batch).__name__}"
        )
    # The official files were written by Python 2: keys come back as bytes.
    batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or (
        data.shape[1] != _PIXELS
    ):
        raise DatasetFormatError(
            f"{path.name}: 'data' must be a uint8 array of shape (N, {_PIXELS})"
        )
    if not isinstance(labels, list) or len(labels) != len(data) or not all(
        isinstance(label, int) and 0 <= label < 10 for label in labels
    ):
        raise DatasetFormatError(f"{path.name}: 'labels' must be {len(data)} integers in [0, 10)")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


CIFAR10 = DatasetSource(
    id="cifar10",
    input_shape=(3, 32, 32),
    num_classes=10,
    scale=255.0,
    build=build_cifar10,
    automatic=False,
    source_hint="a folder of CIFAR-10 python batches",
    how="metaprune data fetch cifar10 --from DIR",
    details=(
        "DIR is the unpacked cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html); "
        "the batches are converted into the cache as an .npz. Alternatively pass DIR itself "
        "wherever a dataset is asked for"
    ),
)
