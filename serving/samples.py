"""Small models and data files for the demo, the load benchmark and the service's tests.

Everything here is real: zoo models saved with `metaprune.save_model`, MNIST-1D samples from
`metaprune.data`. Nothing is downloaded.

Example::

    path = write_model(Path("/tmp/m.pt2"), seed=0)          # a CNN1d for MNIST-1D
    data = write_npz(Path("/tmp/d.npz"), train=256, test=128)
"""

from __future__ import annotations

from pathlib import Path

# input (1, 40): MNIST-1D; two narrow conv layers keep a model in the kilobytes
INPUT_SHAPE = (1, 40)
SMALL_CNN1D = {"widths": [32, 64], "kernel_sizes": [5, 5], "pools": [2, 2]}


def small_model(seed: int = 0, *, overrides: dict | None = None):
    """A small CNN1d for MNIST-1D and its example inputs (batch 1)."""
    import torch
    from metaprune import zoo

    config = zoo.default_config("cnn1d", input_shape=INPUT_SHAPE, num_classes=10)
    config.update(SMALL_CNN1D)
    config.update(overrides or {})
    torch.manual_seed(seed)
    model = zoo.build("cnn1d", config).eval()
    return model, (torch.randn(1, *INPUT_SHAPE),)


def write_model(path: Path, seed: int = 0, *, model=None, example_inputs=None) -> Path:
    """Save a model (default: `small_model(seed)`) as .pt2 or .safetensors + spec."""
    from metaprune.formats import save_model

    if model is None:
        model, example_inputs = small_model(seed)
    save_model(model, example_inputs, str(path))
    return Path(path)


def write_npz(path: Path, *, train: int = 256, test: int = 128) -> Path:
    """A slice of MNIST-1D as the .npz the service's UploadData takes."""
    import numpy as np
    from metaprune.data import load_dataset

    data = load_dataset("mnist1d")
    np.savez(path, x_train=data.x_train[:train].numpy(), y_train=data.y_train[:train].numpy(),
             x_test=data.x_test[:test].numpy(), y_test=data.y_test[:test].numpy())
    return Path(path)
