"""scikit-learn's handwritten digits: 1,797 grey 8x8 images (values 0-16), 10 classes.

Split: 360 test images (about 20 %, 35 to 37 per class) chosen by a stratified split with seed 0
(``sklearn.model_selection.train_test_split(test_size=360, stratify=y, random_state=0)``); the
other 1,437 are the training set.
"""

from pathlib import Path

import numpy as np

from metaprune.data.npz import Splits
from metaprune.data.source import DatasetSource

TEST_SIZE = 360
SPLIT_SEED = 0


def build_digits(source: Path | None = None) -> Splits:
    """Load the digits bundled with scikit-learn and split them; a source is never needed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None, :, :]  # values 0..16 fit in uint8
    x_train, x_test, y_train, y_test = train_test_split(
        images, bunch.target.astype(np.int64), test_size=TEST_SIZE, stratify=bunch.target,
        random_state=SPLIT_SEED,
    )
    return Splits(x_train, y_train, x_test, y_test)


DIGITS = DatasetSource(
    id="digits",
    input_shape=(1, 8, 8),
    num_classes=10,
    scale=16.0,
    build=build_digits,
    automatic=True,
    source_hint=None,
    how="bundled with scikit-learn; split on first use",
)
