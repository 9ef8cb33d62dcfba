"""ONNX export (save only) through the dynamo exporter, checked with ``onnx.checker``.

Example::

    save_onnx(model, (torch.randn(2, 1, 40),), "model.onnx")
"""

from __future__ import annotations

import os

import torch
from torch import nn

from metaprune.errors import UnsupportedModelError
from metaprune.formats.pt2 import dynamic_batch


def save_onnx(module: nn.Module, example_inputs: tuple, path: str | os.PathLike) -> None:
    """Export ``module`` in eval mode to ONNX with a dynamic batch and verify the file."""
    import onnx

    example_inputs, dynamic = dynamic_batch(tuple(example_inputs))
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
