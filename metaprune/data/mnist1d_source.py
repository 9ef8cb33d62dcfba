"""MNIST-1D (Greydanus, 2020): 4,000 train / 1,000 test sequences of length 40, 10 classes.

The official set is regenerated offline from the `mnist1d` package's default arguments (seed
42), which reproduces the published pickle without downloading it.
"""

import random
from pathlib import Path

import numpy as np

from metaprune.data.npz import Splits
from metaprune.data.source import DatasetSource


def build_mnist1d(source: Path | None = None) -> Splits:
    """Generate the official MNIST-1D splits (about 1-3 s on one core); a source is never needed."""
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds Python's and NumPy's global generators; put them back afterwards so
    # loading a dataset never changes a caller's random stream.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        raw = make_dataset(get_dataset_args())
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return Splits(
        x_train=raw["x"].astype(np.float32)[:, None, :],
        y_train=raw["y"].astype(np.int64),
        x_test=raw["x_test"].astype(np.float32)[:, None, :],
        y_test=raw["y_test"].astype(np.int64),
    )


MNIST1D = DatasetSource(
    id="mnist1d",
    input_shape=(1, 40),
    num_classes=10,
    scale=1.0,
    build=build_mnist1d,
    automatic=True,
    source_hint=None,
    how="generated offline by the mnist1d package on first use",
)
