"""Lift an ``ExportedProgram`` into a prunable, trainable ``torch.fx.GraphModule``.

An exported program is a flat graph of functional ATen calls whose parameters arrive as graph
inputs. Pruning tools and training loops want the opposite: modules that *own* their parameters.
:func:`lift_program` rebuilds the graph so that parameters are attributes at their original
fully-qualified names and every recognised parametrised call becomes a real module:

=====================================================  =========================================
ATen call (training IR or decomposed)                    becomes
=====================================================  =========================================
``conv1d/conv2d/conv3d``, ``convolution``                ``nn.Conv1d/2d/3d`` (groups kept)
``conv_transpose1d/2d``, transposed ``convolution``      ``nn.ConvTranspose1d/2d``
``linear``, ``[view →] addmm(b, x, t(w)) [→ view]``, ``mm``  ``nn.Linear``
``batch_norm`` (eval), ``_native_batch_norm_legit_no_training``  ``nn.BatchNorm1d/2d/3d`` + running stats
``layer_norm``, ``native_layer_norm``                    ``nn.LayerNorm``
``group_norm``, ``native_group_norm``                    ``nn.GroupNorm``
``embedding``                                            ``nn.Embedding``
=====================================================  =========================================

A module takes the name of its weight minus ``.weight`` (``features.0.weight`` →
``features.0``; ``attn.in_proj_weight`` → ``attn.in_proj``), so lifted names match the
original model's. A weight shared by several calls stays a plain attribute (the calls stay
functional), since one module cannot stand for two call sites. Attention stays functional here
(its projections become ``nn.Linear``); :func:`metaprune.formats.attention.lift_attention` then
turns recognisable ``nn.MultiheadAttention`` regions back into the module.

Example::

    program = torch.export.export(model.eval(), (x,))
    lifted = lift_program(program)
    assert isinstance(lifted.get_submodule("conv1"), torch.nn.Conv2d)
    torch.testing.assert_close(lifted(x), model(x))
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

from metaprune.errors import ModelFormatError, UnsupportedModelError

aten = torch.ops.aten


def _bind(node: torch.fx.Node) -> dict:
    """Arguments of an ATen call by schema name, defaults filled in."""
    bound = {}
    for index, argument in enumerate(node.target._schema.arguments):
        if index < len(node.args):
            bound[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            bound[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
    return bound


def _ints(value, dims: int) -> tuple[int, ...]:
    """A conv hyper-parameter as a tuple of ``dims`` ints (schemas allow one int or a list)."""
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return values * dims if len(values) == 1 else values


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _set_path(root: nn.Module, path: str, value) -> None:
    """Put a parameter, buffer or module at a dotted path, creating containers on the way."""
    *parents, leaf = path.split(".")
    owner = root
    for part in parents:
        child = owner._modules.get(part)
        if child is None:
            if hasattr(owner, part):
                raise UnsupportedModelError(f"cannot place {path!r}: {part!r} is not a module")
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    if isinstance(value, nn.Module):
        owner.add_module(leaf, value)
    elif isinstance(value, nn.Parameter):
        owner.register_parameter(leaf, value)
    else:
        owner.register_buffer(leaf, value)


class _Lifter:
    """Holds the graph under construction and the root module owning the state."""

    def __init__(self, graph: torch.fx.Graph, root: nn.Module):
        self.graph = graph
        self.root = root
        self.taken: set[str] = set()

    # -- helpers --------------------------------------------------------------------------
    def attr(self, value) -> str | None:
        """The state path of a single-use get_attr node, else None (shared or computed)."""
        if isinstance(value, torch.fx.Node) and value.op == "get_attr" and len(value.users) == 1:
            return value.target
        return None

    def module_path(self, weight_path: str) -> str:
        if weight_path.endswith(".weight"):
            base = weight_path[: -len(".weight")]
        elif weight_path.endswith("_weight"):
            base = weight_path[: -len("_weight")]
        else:
            base = weight_path + "_module"
        candidate, suffix = base, 1
        while candidate in self.taken or not self._placeable(candidate):
            candidate, suffix = f"{base}_{suffix}", suffix + 1
        self.taken.add(candidate)
        return candidate

    def _placeable(self, path: str) -> bool:
        existing = _get_path(self.root, path)
        return existing is None or (type(existing) is nn.Module)

    def install(self, path: str, module: nn.Module, owned: dict[str, str | None]) -> None:
        """Move the tensors at ``owned`` (module attribute -> state path) into ``module``."""
        for name, state_path in owned.items():
            if state_path is None:
                continue
            tensor = _get_path(self.root, state_path)
            *parents, leaf = state_path.split(".")
            holder = _get_path(self.root, ".".join(parents)) if parents else self.root
            delattr(holder, leaf)
            if isinstance(tensor, nn.Parameter):
                setattr(module, name, tensor)
            else:
                if name in module._parameters:
                    del module._parameters[name]
                module.register_buffer(name, tensor)
        previous = _get_path(self.root, path)
        if previous is not None:  # a plain container: keep what it still holds
            for name, child in previous._modules.items():
                module.add_module(name, child)
            for name, param in previous._parameters.items():
                module.register_parameter(name, param)
            for name, buf in previous._buffers.items():
                module.register_buffer(name, buf)
        *parents, leaf = path.split(".")
        owner = _get_path(self.root, ".".join(parents)) if parents else self.root
        if previous is not None:
            delattr(owner, leaf)
        _set_path(self.root, path, module)

    def replace(self, node: torch.fx.Node, path: str, module: nn.Module, owned: dict,
                inputs: tuple, tuple_output: bool = False) -> None:
        self.install(path, module, owned)
        with self.graph.inserting_before(node):
            call = self.graph.call_module(path, inputs)
        call.meta = dict(node.meta)
        if tuple_output:
            for user in list(node.users):
                if user.args[1] == 0:
                    user.replace_all_uses_with(call)
                    call.meta["val"] = user.meta.get("val")
                self.graph.erase_node(user)
        else:
            node.replace_all_uses_with(call)
        self.graph.erase_node(node)

    # -- recognisers ----------------------------------------------------------------------
    def conv(self, node, args):
        weight = self.attr(args["weight"])
        if weight is None or not isinstance(args.get("bias"), (torch.fx.Node, type(None))):
            return
        bias = self.attr(args["bias"]) if args.get("bias") is not None else None
        if args.get("bias") is not None and bias is None:
            return
        w = _get_path(self.root, weight)
        dims = w.dim() - 2
        transposed = args.get("transposed", node.target in _TRANSPOSED_CONV)
        groups = args.get("groups", 1)
        if dims not in (1, 2, 3) or (transposed and dims == 3):
            return
        padding = args.get("padding", 0)
        if isinstance(padding, str):
            if transposed:
                return
        elif any(p < 0 for p in _ints(padding, dims)):
            return
        common = dict(kernel_size=tuple(w.shape[2:]), stride=_ints(args.get("stride", 1), dims),
                      padding=padding if isinstance(padding, str) else _ints(padding, dims),
                      dilation=_ints(args.get("dilation", 1), dims), groups=groups, bias=bias is not None)
        if transposed:
            cls = (nn.ConvTranspose1d, nn.ConvTranspose2d)[dims - 1]
            module = cls(w.shape[0], w.shape[1] * groups,
                         output_padding=_ints(args.get("output_padding", 0), dims), **common)
        else:
            cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
            module = cls(w.shape[1] * groups, w.shape[0], **common)
        self.replace(node, self.module_path(weight), module,
                     {"weight": weight, "bias": bias}, (args["input"],))

    def linear(self, node, x, weight_node, bias_node):
        weight = self.attr(weight_node)
        bias = self.attr(bias_node) if bias_node is not None else None
        if weight is None or (bias_node is not None and bias is None):
            return False
        w = _get_path(self.root, weight)
        if w.dim() != 2 or (bias is not None and tuple(_get_path(self.root, bias).shape) != (w.shape[0],)):
            return False
        module = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        self.replace(node, self.module_path(weight), module, {"weight": weight, "bias": bias}, (x,))
        return True

    def addmm(self, node, args):
        # decomposed Linear: addmm(bias, x, t(W)) or mm(x, t(W)), t = aten.t / permute [1, 0]
        transposed = args["mat2"]
        if not (isinstance(transposed, torch.fx.Node) and len(transposed.users) == 1
                and (transposed.target == aten.t.default
                     or (transposed.target == aten.permute.default and list(transposed.args[1]) == [1, 0]))):
            return
        if node.target == aten.addmm.default and (args.get("beta", 1) != 1 or args.get("alpha", 1) != 1):
            return
        bias = args.get("self") if node.target == aten.addmm.default else None
        weight_node = transposed.args[0]
        x, result = args["mat1"], node
        folded = self._folded_leading_dims(x, node)
        if folded is not None:  # view(x, [-1, in]) -> addmm -> view(.., [*lead, out]): Linear(x)
            x, result = folded
        if self.linear(result, x, weight_node, bias):
            if result is not node:
                self.graph.erase_node(node)
                if not args["mat1"].users:
                    self.graph.erase_node(args["mat1"])
            self.graph.erase_node(transposed)

    @staticmethod
    def _folded_leading_dims(flat, matmul):
        """(x, outer view) when a >2-D Linear was decomposed into view → (add)mm → view."""
        views = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
        if not (isinstance(flat, torch.fx.Node) and flat.target in views and len(matmul.users) == 1):
            return None
        outer = next(iter(matmul.users))
        source = flat.args[0]
        if outer.target not in views or not isinstance(source, torch.fx.Node):
            return None
        before, after = source.meta.get("val"), outer.meta.get("val")
        if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)):
            return None
        if before.dim() < 3 or [str(d) for d in before.shape[:-1]] != [str(d) for d in after.shape[:-1]]:
            return None
        return source, outer

    def batch_norm(self, node, args, tuple_output):
        if args.get("training", False):
            return  # batch statistics: leave functional, its semantics differ from eval BN
        weight, bias = self.attr(args["weight"]), self.attr(args["bias"])
        mean, var = self.attr(args["running_mean"]), self.attr(args["running_var"])
        if mean is None or var is None or (args["weight"] is not None and weight is None) \
                or (args["bias"] is not None and bias is None) or ((weight is None) != (bias is None)):
            return
        if tuple_output and not self._only_first_output(node):
            return
        rm = _get_path(self.root, mean)
        ndim = self._ndim(args["input"])
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(ndim)
        if cls is None:
            return
        module = cls(rm.shape[0], eps=args["eps"], momentum=args["momentum"], affine=weight is not None)
        # the lifted model runs in eval mode until the caller trains it
        module.eval()
        path = self.module_path(mean[: -len("running_mean")] + "weight" if mean.endswith("running_mean")
                                else weight or mean)
        self.replace(node, path, module,
                     {"weight": weight, "bias": bias, "running_mean": mean, "running_var": var},
                     (args["input"],), tuple_output)

    def layer_norm(self, node, args, tuple_output):
        weight = self.attr(args["weight"])
        bias = self.attr(args["bias"]) if args["bias"] is not None else None
        if weight is None or (args["bias"] is not None and bias is None):
            return
        if tuple_output and not self._only_first_output(node):
            return
        module = nn.LayerNorm(list(args["normalized_shape"]), eps=args["eps"], bias=bias is not None)
        self.replace(node, self.module_path(weight), module, {"weight": weight, "bias": bias},
                     (args["input"],), tuple_output)

    def group_norm(self, node, args, tuple_output):
        weight = self.attr(args["weight"])
        bias = self.attr(args["bias"]) if args["bias"] is not None else None
        if weight is None or bias is None:
            return
        if tuple_output and not self._only_first_output(node):
            return
        w = _get_path(self.root, weight)
        module = nn.GroupNorm(args["group"] if tuple_output else args["num_groups"], w.shape[0], eps=args["eps"])
        self.replace(node, self.module_path(weight), module, {"weight": weight, "bias": bias},
                     (args["input"],), tuple_output)

    def embedding(self, node, args):
        weight = self.attr(args["weight"])
        if weight is None or args.get("sparse"):
            return
        w = _get_path(self.root, weight)
        padding = args.get("padding_idx", -1)
        module = nn.Embedding(w.shape[0], w.shape[1], padding_idx=None if padding < 0 else padding,
                              scale_grad_by_freq=bool(args.get("scale_grad_by_freq", False)))
        self.replace(node, self.module_path(weight), module, {"weight": weight}, (args["indices"],))

    # -- utilities ------------------------------------------------------------------------
    @staticmethod
    def _only_first_output(node) -> bool:
        # deserialised programs keep dead getitems for the unused mean / rstd outputs
        return all(u.target is operator.getitem and (u.args[1] == 0 or not u.users) for u in node.users)

    @staticmethod
    def _ndim(value) -> int | None:
        val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
        return val.dim() if isinstance(val, torch.Tensor) else None

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            target = node.target
            if target in _CONV:
                self.conv(node, _bind(node))
            elif target == aten.linear.default:
                args = _bind(node)
                self.linear(node, args["input"], args["weight"], args.get("bias"))
            elif target in (aten.addmm.default, aten.mm.default):
                self.addmm(node, _bind(node))
            elif target == aten.batch_norm.default:
                self.batch_norm(node, _bind(node), tuple_output=False)
            elif target == aten._native_batch_norm_legit_no_training.default:
                self.batch_norm(node, {**_bind(node), "training": False}, tuple_output=True)
            elif target == aten.layer_norm.default:
                self.layer_norm(node, _bind(node), tuple_output=False)
            elif target == aten.native_layer_norm.default:
                self.layer_norm(node, _bind(node), tuple_output=True)
            elif target == aten.group_norm.default:
                self.group_norm(node, _bind(node), tuple_output=False)
            elif target == aten.native_group_norm.default:
                self.group_norm(node, _bind(node), tuple_output=True)
            elif target == aten.embedding.default:
                self.embedding(node, _bind(node))
        for node in list(self.graph.nodes):  # state consumed by modules leaves dead get_attrs
            if node.op == "get_attr" and not node.users:
                self.graph.erase_node(node)


_CONV = {
    aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
    aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding,
    aten.convolution.default, aten.conv_transpose1d.default, aten.conv_transpose2d.input,
}
_TRANSPOSED_CONV = {aten.conv_transpose1d.default, aten.conv_transpose2d.input}


def _state_tensor(program, name: str, trainable: bool):
    if name in program.state_dict:
        tensor = program.state_dict[name]
    elif name in program.constants:
        tensor = program.constants[name]
    else:
        raise UnsupportedModelError(f"the program refers to missing state {name!r}")
    if not isinstance(tensor, torch.Tensor):
        raise UnsupportedModelError(f"state {name!r} is a {type(tensor).__name__}, not a tensor")
    tensor = tensor.detach().clone()
    if trainable:
        return nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    return tensor


def lift_program(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """Turn an exported program into a GraphModule whose layers are real ``nn`` modules.

    Args:
        program: an ``ExportedProgram`` (already through the strict intake when it came from
            a client file).

    Returns:
        A ``torch.fx.GraphModule`` in eval mode taking the program's tensor inputs
        positionally; parameters ``requires_grad`` (floating point ones) and live at the
        original fully-qualified names. Call
        :func:`metaprune.formats.shapes.record_shapes` with example inputs before pruning it.

    Raises:
        UnsupportedModelError: the program mutates buffers, takes non-tensor or nested inputs.
        ModelFormatError: the graph has no tensor input.
    """
    signature = program.graph_signature
    kinds = {spec.kind.name for spec in signature.output_specs}
    if kinds - {"USER_OUTPUT"}:
        raise UnsupportedModelError(
            f"the exported program has outputs of kind {sorted(kinds - {'USER_OUTPUT'})} "
            "(buffer mutation); export the model in eval mode")
    in_spec = program.call_spec.in_spec
    args_spec, kwargs_spec = (in_spec.children() if in_spec is not None else (None, None))
    if kwargs_spec is not None and kwargs_spec.num_leaves:
        raise UnsupportedModelError("the exported program takes keyword inputs; export with positional tensors")
    if args_spec is not None and any(child.num_leaves != 1 or child.children() for child in args_spec.children()):
        raise UnsupportedModelError("the exported program takes nested inputs; export with flat tensor inputs")

    root = nn.Module()
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    placeholders = {spec.arg.name: spec for spec in signature.input_specs}
    tensor_inputs = 0
    for node in program.graph.nodes:
        if node.op == "placeholder":
            spec = placeholders[node.name]
            kind = spec.kind.name
            if kind == "USER_INPUT":
                if not isinstance(node.meta.get("val"), torch.Tensor):
                    raise UnsupportedModelError(
                        f"graph input {node.name!r} is not a tensor; only tensor inputs are supported")
                tensor_inputs += 1
                env[node] = graph.placeholder(node.name)
                env[node].meta = dict(node.meta)
                continue
            if kind in ("PARAMETER", "BUFFER"):
                path = spec.target
            elif kind in ("CONSTANT_TENSOR",):
                path = "_constants." + spec.target.replace(".", "_")
            else:
                raise UnsupportedModelError(f"unsupported graph input kind {kind} for {node.name!r}")
            if _get_path(root, path) is None:
                _set_path(root, path, _state_tensor(program, spec.target, kind == "PARAMETER"))
            env[node] = graph.get_attr(path)
            env[node].meta = dict(node.meta)
        elif node.op == "call_function":
            env[node] = graph.node_copy(node, lambda n: env[n])
        elif node.op == "output":
            outputs = [env[n] if isinstance(n, torch.fx.Node) else n for n in node.args[0]]
            out_spec = program.call_spec.out_spec
            structured = pytree.tree_unflatten(outputs, out_spec) if out_spec is not None else tuple(outputs)
            graph.output(structured)
        else:
            raise UnsupportedModelError(f"unsupported node {node.format_node()}")
    if tensor_inputs == 0:
        raise ModelFormatError("the model's graph has no tensor input; nothing could be fed to it")

    _Lifter(graph, root).run()
    lifted = torch.fx.GraphModule(root, graph, class_name="LiftedModel")
    lifted.graph.eliminate_dead_code()
    lifted.graph.lint()
    lifted.recompile()
    lifted.eval()
    return lifted
