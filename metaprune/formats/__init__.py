"""Load and save models safely: ``.pt2``, ``.safetensors`` + spec, ``.onnx`` (save only).

The suffix picks the format:

* ``.pt2`` — any supported model. Loading runs the strict intake
  (:mod:`metaprune.formats.intake`: bounded zip, only the members ``torch.export.save``
  writes, no pickles, payload sizes matching ``tensor_meta``, symbolic expressions and node
  targets checked; ``torch.export.load`` only ever sees a sanitised copy), then lifts the
  program into a ``torch.fx.GraphModule`` whose conv / linear / norm / embedding calls are real
  ``nn`` modules (:mod:`metaprune.formats.lift`; exported ``nn.MultiheadAttention`` regions
  become real ``nn.MultiheadAttention`` again, :mod:`metaprune.formats.attention`), refuses
  NaN/Inf weights and models above ``max_params``, and records baked shape constants
  (:mod:`metaprune.formats.shapes`).
  Saving exports in eval mode with a dynamic batch ``torch.export.Dim``.
* ``.safetensors`` with a sibling spec ``NAME.json`` =
  ``{"format": 1, "family": ID, "config": {...}, "input_shape": [...]}`` — zoo families only.
  On save the family is the ``family=`` keyword, else ``metaprune.zoo.family_of(module)``, and
  the config is ``metaprune.zoo.config_of(family, module)`` (so pruned zoo models round-trip).
* ``.onnx`` — save only (``torch.onnx.export(..., dynamo=True)`` + ``onnx.checker``).

For the pruning engine: after physically pruning a module returned by :func:`load_model`, call
:func:`refresh_shapes` ``(module, example_inputs)``. It rewrites the shape constants the export
baked into ``view``/``reshape``/``unflatten``/``expand``/``split``/``slice`` nodes (the names are
in ``module.baked_shape_nodes``) from the pruned shapes, or raises
:class:`~metaprune.errors.UnsupportedModelError` naming the node when a constant cannot be
recomputed unambiguously (e.g. a head split whose heads and head size both could absorb the
change). To avoid that refusal up front, leave the modules in ``module.shape_locked_layers``
(:func:`shape_locked_layers`) out of pruning (torch-pruning ``ignored_layers``): they feed such
ambiguous splits.

Example::

    from metaprune.formats import load_model, refresh_shapes, save_model

    model, example_inputs = load_model("client.pt2", max_params=10_000_000)
    # ...prune channels of `model` with torch-pruning, ignoring model.shape_locked_layers...
    refresh_shapes(model, example_inputs)
    save_model(model, example_inputs, "pruned.pt2")
    save_model(model, example_inputs, "pruned.onnx")
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from metaprune.errors import ModelFormatError
from metaprune.formats.intake import IntakeLimits
from metaprune.formats.shapes import record_shapes, refresh_shapes, shape_locked_layers

__all__ = ["IntakeLimits", "SUFFIXES", "load_model", "record_shapes", "refresh_shapes", "save_model",
           "shape_locked_layers"]

#: suffix -> (loadable, savable)
SUFFIXES = {".pt2": (True, True), ".safetensors": (True, True), ".onnx": (False, True)}


def _suffix(path: str | os.PathLike, loading: bool) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES or not SUFFIXES[suffix][0 if loading else 1]:
        usable = [s for s, ok in SUFFIXES.items() if ok[0 if loading else 1]]
        raise ModelFormatError(
            f"cannot {'load' if loading else 'save'} {Path(path).name!r}: the suffix must be one of {usable}")
    return suffix


def load_model(path: str | os.PathLike, *, max_params: int = 100_000_000,
               limits: IntakeLimits | None = None) -> tuple[nn.Module, tuple]:
    """Load a model file into a prunable module.

    Args:
        path: a ``.pt2`` archive, a ``.safetensors`` file with its ``NAME.json`` spec beside it,
            or a HuggingFace folder (``config.json`` + safetensors; `metaprune.formats.hf`).
        max_params: most parameters accepted (100 M by default, the service's limit).
        limits: full ``.pt2`` intake bounds; its ``max_params`` is replaced by ``max_params``.

    Returns:
        ``(module, example_inputs)``: the module in eval mode and a tuple of input tensors
        (batch 2 unless the archive carried verified sample inputs).

    Raises:
        ModelFormatError: the file is malformed, unsafe, too large, or holds NaN/Inf weights.
        UnsupportedModelError: the program uses a construct the lifting does not support.

    Example::

        model, example_inputs = load_model("resnet.pt2")
        logits = model(*example_inputs)
    """
    from metaprune.formats.hf import is_hf_folder, load_hf_folder

    if is_hf_folder(path):  # a HuggingFace folder: config.json + safetensors
        return load_hf_folder(path, max_params=max_params)
    suffix = _suffix(path, loading=True)
    if suffix == ".pt2":
        from dataclasses import replace

        from metaprune.formats.pt2 import load_pt2

        return load_pt2(path, replace(limits or IntakeLimits(), max_params=max_params))
    from metaprune.formats.safetensors_spec import load_safetensors

    module, example_inputs = load_safetensors(path)
    params = sum(p.numel() for p in module.parameters())
    if params > max_params:
        raise ModelFormatError(f"{params} parameters, more than the limit {max_params}")
    return module, example_inputs


def save_model(module: nn.Module, example_inputs: tuple, path: str | os.PathLike, *,
               family: str | None = None) -> None:
    """Save ``module`` in the format its suffix names.

    Args:
        module: any module torch.export can capture (``.pt2``, ``.onnx``), or a zoo model
            (``.safetensors``).
        example_inputs: a tuple of input tensors with the batch dim first.
        path: ``.pt2``, ``.safetensors`` (writes ``NAME.json`` beside it), ``.onnx``, or a
            folder without suffix for a transformers model (``save_pretrained``, when its
            config can state the pruned shapes; else a ModelFormatError saying why).
        family: zoo family id for ``.safetensors``; by default read from the module's class.

    Example::

        save_model(model, (torch.randn(2, 1, 40),), "model.safetensors")   # + model.json
    """
    if Path(path).suffix == "" and hasattr(module, "save_pretrained"):
        from metaprune.formats.hf import save_hf_folder

        save_hf_folder(module, path)  # a folder: save_pretrained when the config can say it
        return
    suffix = _suffix(path, loading=False)
    example_inputs = tuple(example_inputs)
    if suffix == ".pt2":
        from metaprune.formats.pt2 import save_pt2

        save_pt2(module, example_inputs, path)
    elif suffix == ".safetensors":
        from metaprune.formats.safetensors_spec import save_safetensors

        save_safetensors(module, example_inputs, path, family=family)
    else:
        from metaprune.formats.onnx_export import save_onnx

        save_onnx(module, example_inputs, path)
