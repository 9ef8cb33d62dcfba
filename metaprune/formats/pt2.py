"""``.pt2`` (torch.export archive): strict load into a lifted module, save with a dynamic batch.

Example::

    module, example_inputs = load_pt2("client.pt2")        # strict intake + lifting
    save_pt2(module, example_inputs, "again.pt2")
"""

from __future__ import annotations

import math
import operator
import os
import tempfile
import warnings

import torch
from torch import nn

from metaprune.errors import MetaPruneError, ModelFormatError, UnsupportedModelError
from metaprune.formats.attention import lift_attention
from metaprune.formats.intake import IntakeLimits, read_pt2_strict
from metaprune.formats.lift import lift_program
from metaprune.formats.shapes import record_shapes

# Largest batch the saved program accepts; the export proves the graph for 1..MAX_BATCH.
MAX_BATCH = 1 << 16


def _hint(size) -> int:
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else 2


def _rebuild_inputs(module: torch.fx.GraphModule, limits: IntakeLimits) -> tuple:
    """Example inputs made from the graph's input specs (shape, dtype); deterministic."""
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for node in module.graph.find_nodes(op="placeholder"):
        val = node.meta["val"]
        shape = [_hint(s) for s in val.shape]
        numel = 1
        for s in shape:
            numel *= s
        if numel > limits.max_input_numel:
            raise ModelFormatError(f"graph input {node.name!r} has an absurd shape {shape}")
        if val.dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(val.dtype))
        else:  # integer inputs are usually indices: zeros are valid for every embedding
            inputs.append(torch.zeros(shape, dtype=val.dtype))
    return tuple(inputs)


def _verified_sample_inputs(sample_inputs, module: torch.fx.GraphModule):
    """The archive's own sample inputs when they are plain tensors matching the graph inputs."""
    if sample_inputs is None:
        return None
    args, kwargs = sample_inputs
    placeholders = module.graph.find_nodes(op="placeholder")
    if kwargs or len(args) != len(placeholders):
        return None
    for arg, node in zip(args, placeholders):
        val = node.meta["val"]
        if not isinstance(arg, torch.Tensor) or arg.dtype != val.dtype or arg.dim() != val.dim():
            return None
    return tuple(arg.detach().clone() for arg in args)


def check_finite(module: nn.Module) -> None:
    """Refuse NaN / Inf in parameters and buffers, naming the first offending tensor."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFormatError(f"tensor {name!r} holds NaN or Inf values; the model cannot be pruned")


def load_pt2(path: str | os.PathLike, limits: IntakeLimits | None = None):
    """Strictly read a ``.pt2`` and lift it; returns ``(module, example_inputs)``.

    Args:
        path: the archive.
        limits: intake bounds, e.g. ``IntakeLimits(max_params=...)``.
    """
    limits = limits or IntakeLimits()
    program, sample_inputs = read_pt2_strict(path, limits)
    _check_targets(program)
    try:
        module = lift_program(program)
    except MetaPruneError:
        raise
    except Exception as err:  # a program torch accepted but whose structure we cannot follow
        raise UnsupportedModelError(f"cannot lift the exported program: {type(err).__name__}: {err}"[:1000]) from err
    params = sum(p.numel() for p in module.parameters())
    if params > limits.max_params:
        raise ModelFormatError(f"{params} parameters, more than the limit {limits.max_params}")
    check_finite(module)
    example_inputs = _verified_sample_inputs(sample_inputs, module) or _rebuild_inputs(module, limits)
    try:
        lift_attention(module, example_inputs)
        record_shapes(module, example_inputs)
    except Exception as err:  # running the graph is where inconsistent metadata shows
        raise ModelFormatError(f"the model does not run on inputs of its own input specs: "
                               f"{type(err).__name__}: {err}"[:1000]) from err
    return module, example_inputs


_PYTHON_TARGETS = (operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                   operator.truediv, operator.mod, operator.neg, operator.pow, operator.eq, operator.ne,
                   operator.lt, operator.le, operator.gt, operator.ge, operator.and_, operator.or_,
                   operator.not_, math.ceil, math.floor, math.trunc, math.sqrt, torch.sym_int,
                   torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_sqrt,
                   torch.sym_ite, torch.sym_sum)


def _check_targets(program) -> None:
    """Defence in depth after deserialisation: only ATen overloads and symbolic-int helpers."""
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.HigherOrderOperator):
            raise UnsupportedModelError(
                f"operator {target.name()} at node {node.name!r} (control flow / wrapped regions) is "
                "not supported; export without torch.cond, no_grad or autocast regions")
        if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
            continue
        if any(target is allowed for allowed in _PYTHON_TARGETS):
            continue
        raise ModelFormatError(f"graph node {node.name!r} calls {target!r:.100}, which is not an ATen operator")


def dynamic_batch(example_inputs: tuple) -> tuple[tuple, tuple]:
    """Inputs fit for exporting with a dynamic batch, and the ``dynamic_shapes`` to pass.

    Every batched tensor input shares one ``torch.export.Dim("batch")``. Export specialises a
    dynamic dim whose example size is 0 or 1, so a batch of 1 is repeated to 2.
    """
    inputs = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1 else x
                   for x in example_inputs)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return inputs, tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() else None for x in inputs)


def export_program(module: nn.Module, example_inputs: tuple) -> torch.export.ExportedProgram:
    """Export ``module`` in eval mode with a dynamic batch dim on every tensor input.

    Falls back to a static batch (with a warning) when the module itself bakes its batch size.
    """
    from metaprune.formats.hf import export_patches

    example_inputs, dynamic = dynamic_batch(tuple(example_inputs))
    was_training = module.training
    module.eval()
    try:
        with export_patches(module):  # transformers: a mask torch.export can serialise
            try:
                return _inline_mode_wrappers(
                    torch.export.export(module, example_inputs, dynamic_shapes=dynamic))
            except Exception as dynamic_err:  # constraint violations come in several types
                try:
                    program = torch.export.export(module, example_inputs)
                except Exception as err:
                    raise UnsupportedModelError(
                        f"torch.export cannot capture the model: {type(err).__name__}: {err}"[:2000]) from err
                warnings.warn(f"exported with a static batch size ({type(dynamic_err).__name__}: "
                              f"{str(dynamic_err)[:200]})", stacklevel=3)
                return _inline_mode_wrappers(program)
    finally:
        module.train(was_training)


def _inline_mode_wrappers(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """A program without higher-order wrappers: code under ``torch.no_grad()`` or
    ``torch.autocast(enabled=False)`` (transformers' rotary embeddings) is exported as
    ``wrap_with_set_grad_enabled`` / ``wrap_with_autocast`` around a submodule, which the strict
    intake refuses (ATen operators only); lowering to the inference IR inlines them."""
    if any(isinstance(node.target, torch._ops.HigherOrderOperator)
           for node in program.graph.nodes):
        return program.run_decompositions({})
    return program


def save_pt2(module: nn.Module, example_inputs: tuple, path: str | os.PathLike) -> None:
    """Export ``module`` (dynamic batch) and write it atomically to ``path``."""
    program = export_program(module, example_inputs)
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(suffix=".pt2", dir=folder)
    os.close(handle)
    try:
        torch.export.save(program, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
