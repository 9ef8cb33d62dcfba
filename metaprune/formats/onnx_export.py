"""ONNX export (save only) through the dynamo exporter, checked with ``onnx.checker``.

Example::

    save_onnx(model, (torch.randn(2, 1, 40),), "model.onnx")
"""

from __future__ import annotations

import os

import torch
from torch import nn

from metaprune.errors import UnsupportedModelError


def save_onnx(module: nn.Module, example_inputs: tuple, path: str | os.PathLike) -> None:
    """Export ``module`` in eval mode to ONNX with a dynamic batch and verify the file."""
    import onnx

    example_inputs = tuple(example_inputs)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dynamic = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() else None for x in example_inputs)
    if any(isinstance(x, torch.Tensor) and x.dim() and x.shape[0] < 2 for x in example_inputs):
        dynamic = None  # a batch of 1 would be specialised anyway
    was_training = module.training
    module.eval()
    try:
        program = torch.onnx.export(module, example_inputs, dynamo=True, dynamic_shapes=dynamic,
                                    verbose=False)
        program.save(os.fspath(path))
        onnx.checker.check_model(os.fspath(path))
    except Exception as err:  # exporter failures surface as many types
        raise UnsupportedModelError(f"ONNX export failed: {type(err).__name__}: {err}"[:2000]) from err
    finally:
        module.train(was_training)
