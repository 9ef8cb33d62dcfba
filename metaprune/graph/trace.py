"""One forward pass that follows every channel from the model input to the output.

`ChannelTracer` is a `TorchFunctionMode`: it sees every torch operator called outside the
parametrised layers and moves the channel label planes (`metaprune.graph.planes`) along with the
data. Parametrised layers (`metaprune.graph.rules.LAYER_RULES`) are handled by forward hooks that
turn their weights into graph edges and give their output fresh channel nodes.

Operator families and the one rule each follows:

- data movement (view, reshape, flatten, permute, transpose, getitem, split, expand, pad, ...):
  the same operator is applied to the planes;
- concatenation / stack: planes are concatenated; an operand without a plane along a
  non-concatenated axis borrows its neighbour's (a class token joins the patch tokens' channels);
- elementwise binary (add, sub, mul, div, maximum, where): equal planes pass; different planes
  meet in new merge nodes, one per channel pair, with identity edges (`GraphBuilder.merge`);
- reductions (mean, sum, amax, ...): planes constant along the reduced axes survive;
- matmul / einsum / scaled_dot_product_attention: planes not varying along a contracted axis
  survive (attention output channels are the value channels);
- anything else: a plane survives where the operator leaves its axes' sizes unchanged (pooling,
  activations, softmax, interpolation); a plane whose axis changed size is lost and the output is
  marked, so a layer that later reads those channels raises `UnsupportedModelError`.

Why this tracer and not torch-pruning's `DependencyGraph` for channel identity: the graph needs,
for every weight entry, the exact node of its input channel. torch-pruning records module-level
dependencies with index mappings for concatenation, split and one flatten stride; permute and
transpose are "element-wise" to it, so an MLP-Mixer token-mixing Linear lands in the channel group
and a fused-qkv reshape has no per-entry mapping. Following the data with the model's own
operators is exact by construction. The pruner and `metaprune inspect` keep using torch-pruning's
groups; `NetworkGraph.coupled_channels` agrees with them wherever torch-pruning is right (tests).

Parameters outside the supported layers ("free" parameters: class tokens, positional embeddings)
may only be added to or concatenated with activations; they go to the side store. Any other use
of a parameter raises `UnsupportedModelError` naming the operator, the parameter and the module.
"""

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from metaprune.errors import UnsupportedModelError
from metaprune.graph.builder import GraphBuilder
from metaprune.graph.planes import (
    PARAM_ATTR,
    POISON_ATTR,
    along,
    compress,
    expand_full,
    pad_left,
    planes_of,
    poison_of,
    set_planes,
    signature,
)
from metaprune.graph.planes import channel_labels as channel_labels_of
from metaprune.graph.rules import fold_norm, functional_linear

# per-channel tensors of functional normalisations: (slot, positional index, keyword)
FUNCTIONAL_NORMS = {
    "layer_norm": ("layer", (("norm_weight", 2, "weight"), ("norm_bias", 3, "bias"))),
    "rms_norm": ("layer", (("norm_weight", 2, "weight"),)),
    "group_norm": ("group", (("norm_weight", 2, "weight"), ("norm_bias", 3, "bias"))),
    "batch_norm": ("batch", (("norm_running_mean", 1, "running_mean"),
                             ("norm_running_var", 2, "running_var"),
                             ("norm_weight", 3, "weight"), ("norm_bias", 4, "bias"))),
    "instance_norm": ("instance", (("norm_running_mean", 1, "running_mean"),
                                   ("norm_running_var", 2, "running_var"),
                                   ("norm_weight", 3, "weight"), ("norm_bias", 4, "bias"))),
}
# reshapes that may split one channel axis into several (attention heads): each index of the
# outer axis becomes one unit a pruner removes whole
SPLITTING = frozenset(("view", "reshape", "unflatten", "_unsafe_view", "view_as", "reshape_as"))
COUPLE_ATTR = "_metaprune_couple"  # head labels of attention scores (pruner only, not the graph)

DATA_MOVEMENT = frozenset(
    "view reshape flatten unflatten permute transpose t swapaxes swapdims movedim moveaxis "
    "__getitem__ select narrow split split_with_sizes tensor_split chunk unbind expand expand_as "
    "broadcast_to repeat tile repeat_interleave unsqueeze squeeze contiguous clone flip roll "
    "index_select view_as reshape_as pixel_shuffle pixel_unshuffle channel_shuffle "
    "native_channel_shuffle pad rot90 T mT slice index alias _unsafe_view".split()
)
CONCAT = frozenset(("cat", "concat", "concatenate", "stack"))
BINARY = {
    "add": "add", "add_": "add", "__add__": "add", "__radd__": "add", "__iadd__": "add",
    "sub": "sub", "sub_": "sub", "__sub__": "sub", "__rsub__": "sub", "__isub__": "sub",
    "rsub": "sub", "subtract": "sub",
    "mul": "mul", "mul_": "mul", "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul",
    "multiply": "mul",
    "div": "div", "div_": "div", "__truediv__": "div", "__rtruediv__": "div",
    "__itruediv__": "div", "true_divide": "div", "divide": "div",
    "maximum": "maximum", "minimum": "minimum", "fmax": "maximum", "fmin": "minimum",
    "where": "where",
}  # fmt: skip
REDUCTIONS = frozenset(
    "mean sum amax amin max min std var logsumexp prod nansum nanmean median argmax argmin "
    "all any".split()
)
MATMUL = frozenset(("matmul", "__matmul__", "bmm", "mm"))
FACTORIES = frozenset(
    "new_zeros new_ones new_full new_empty new_tensor zeros_like ones_like full_like empty_like "
    "rand_like randn_like randint_like".split()
)
# reads of metadata and attribute getters (shape, dtype, .data): harmless on any tensor, but a
# tensor they return from a parameter (``weight.data``) stays tied to that parameter
METADATA = frozenset(
    "__get__ size dim numel nelement ndimension __len__ stride is_contiguous is_floating_point "
    "is_complex element_size get_device data_ptr storage_offset".split()
)
# in-place writes of other data into (part of) a tensor: its channels can no longer be told
IN_PLACE_WRITES = frozenset(
    "__setitem__ copy_ index_copy_ index_put_ masked_scatter_ scatter_ scatter_add_".split()
)
CASTS = frozenset(
    "to type type_as float double half bfloat16 detach clone contiguous _to_copy".split()
)
_GETTERS = {torch.Tensor.T: "T", torch.Tensor.mT: "mT"}


def op_name(func) -> str:
    """The operator's base name: ``cat`` for torch.cat, Tensor.cat and aten.cat.default alike.

    Exported programs (``.pt2`` lifted by `metaprune.formats`) call aten overloads directly;
    their ``*_copy`` variants are the functional forms of the same views.
    """
    if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        name = func._opname if isinstance(func, torch._ops.OpOverload) else func.__name__
        name = name.removesuffix("_copy") if name != "_to_copy" else name
        if "scaled_dot_product" in name:
            return "scaled_dot_product_attention"
        return name
    owner = getattr(func, "__self__", None)
    if owner is not None and getattr(func, "__name__", "") == "__get__":
        for descriptor, name in _GETTERS.items():
            if owner is descriptor:
                return name
    return getattr(func, "__name__", repr(func))


class ChannelTracer(TorchFunctionMode):
    """Propagates channel planes through one forward pass of `model` (see module docstring)."""

    def __init__(self, model: nn.Module, builder: GraphBuilder, layer_modules: dict):
        super().__init__()
        self.builder = builder
        self.layer_depth = 0  # > 0 while inside a parametrised layer: its ops are not followed
        self.location: list[str] = []  # module path stack, for error messages and merge names
        owned = {}
        for name, module in layer_modules.items():
            for pname, param in module.named_parameters():
                owned[id(param)] = f"{name}.{pname}" if name else pname
        self.layer_params = owned
        self.layer_param_names = set(owned.values())
        self.free_params = {
            id(p): n for n, p in model.named_parameters() if id(p) not in owned
        }
        self.owner_type = {
            f"{mname}.{pname}" if mname else pname: type(module).__name__
            for mname, module in model.named_modules()
            for pname, _ in module.named_parameters(recurse=False)
        }
        self.used_free_params: set[str] = set()
        # free parameters whose values are graph features: `scale` slots, functional norms and
        # functional linears (used once; never kept in the side store)
        self.scale_params: set[str] = set()
        self._free_tensors = {
            n: p for n, p in model.named_parameters() if id(p) not in owned
        }
        self._buffer_names = {id(b): n for n, b in model.named_buffers()}
        self.functional_norms = 0  # F.layer_norm & co. on the model's own parameters

    @property
    def where(self) -> str:
        return self.location[-1] if self.location else ""

    def _where_text(self) -> str:
        return f"module '{self.where}'" if self.where else "the model's forward"

    # ------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.layer_depth > 0:
            return func(*args, **kwargs)
        name = op_name(func)
        flat_in = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if name in METADATA:
            return self._metadata(func, args, kwargs, flat_in)
        if name in FUNCTIONAL_NORMS and any(self._parameter_name(t) for t in flat_in[1:]):
            return self._functional_norm(name, func, args, kwargs)
        if name == "addmm" and len(args) >= 3 and self._free_weight(args[2]):
            return self._functional_linear(func, args, kwargs)
        free_in = self._check_parameters(name, flat_in)
        out = func(*args, **kwargs)
        if name in IN_PLACE_WRITES and planes_of(args[0]):
            setattr(args[0], POISON_ATTR, f"in-place write '{name}' in {self._where_text()}")
            return out
        flat_out = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if not flat_out or not flat_in:
            return out
        if free_in and (name in DATA_MOVEMENT or name in CASTS or all(
            hasattr(t, PARAM_ATTR) or isinstance(t, nn.Parameter) for t in flat_in
        )):
            # views/casts of a free parameter stay "free": only add/cat may consume them
            for o in flat_out:
                setattr(o, PARAM_ATTR, free_in[0])
            return out
        poisons = [p for p in map(poison_of, flat_in) if p]
        self._propagate(name, func, args, kwargs, flat_in, out, flat_out)
        if name not in MATMUL and name != "scaled_dot_product_attention":
            _carry_head_labels(flat_in, flat_out)
        if poisons:
            for o in flat_out:
                setattr(o, POISON_ATTR, poisons[0])
        return out

    def _metadata(self, func, args, kwargs, flat_in):
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or not flat_in:
            return out
        owner = next((self._parameter_name(t) for t in flat_in if self._parameter_name(t)), None)
        if owner is not None:
            setattr(out, PARAM_ATTR, owner)
        elif out.shape == flat_in[0].shape:  # x.data: the same channels
            set_planes(out, planes_of(flat_in[0]))
        return out

    def _parameter_name(self, tensor) -> str | None:
        if hasattr(tensor, PARAM_ATTR):
            return getattr(tensor, PARAM_ATTR)
        if isinstance(tensor, nn.Parameter):
            key = id(tensor)
            return self.layer_params.get(key) or self.free_params.get(
                key, "<parameter not in the model>")
        return None

    def _functional_norm(self, name, func, args, kwargs):
        """``F.layer_norm(x, shape, self.weight, self.bias)`` and its kin on a module's own
        parameters: folded into the channels exactly like the module forms."""
        kind, fields = FUNCTIONAL_NORMS[name]
        source = args[0]
        out = func(*args, **kwargs)
        entries = []
        for slot, position, keyword in fields:
            value = args[position] if len(args) > position else kwargs.get(keyword)
            if not isinstance(value, torch.Tensor):
                continue
            pname = self._parameter_name(value) or self._buffer_names.get(id(value))
            if pname is None or pname in self.layer_param_names:
                raise UnsupportedModelError(
                    f"operator '{name}' in {self._where_text()} normalises with a tensor that is "
                    "not a parameter or buffer of the model (or one owned by another layer)"
                )
            tensor = self._free_tensors.get(pname)
            entries.append((slot, pname, tensor if tensor is not None else value))
        axis, groups = 1, 1
        if name in ("layer_norm", "rms_norm"):
            shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
            if len(tuple(shape)) != 1:
                raise UnsupportedModelError(
                    f"operator '{name}' in {self._where_text()} normalises "
                    f"{len(tuple(shape))} axes with an affine per element; the graph folds one "
                    "parameter per channel")
            axis = source.dim() - 1
        elif name == "group_norm":
            groups = args[1] if len(args) > 1 else kwargs["num_groups"]
        used = [pname for _, pname, _ in entries]
        if any(p in self.scale_params for p in used):
            raise UnsupportedModelError(
                f"operator '{name}' in {self._where_text()} reuses normalisation parameters "
                f"{used}; the graph cannot represent one weight at two places")
        planes = fold_norm(self.builder, self.where or name, name, kind, source, axis, entries,
                           groups)
        self.scale_params.update(p for p in used if p in self._free_tensors)
        self.functional_norms += 1
        set_planes(out, planes)
        return out

    def _free_weight(self, tensor) -> str | None:
        """The name of a 2-D free parameter of the model (a weight no layer rule owns)."""
        pname = self._parameter_name(tensor) if isinstance(tensor, torch.Tensor) else None
        if pname in self._free_tensors and tensor.dim() == 2:
            return pname
        return None

    def _functional_linear(self, func, args, kwargs):
        """``addmm(bias, x, W)`` on a module's own parameters, ``W`` stored ``[in, out]``:
        the Linear rule with the transposed layout (`rules.functional_linear`)."""
        bias, source, weight = args[:3]
        weight_name = self._free_weight(weight)
        bias_name = self._parameter_name(bias) if isinstance(bias, torch.Tensor) else None
        module_path = weight_name.rsplit(".", 1)[0] if "." in weight_name else ""
        scaled = any(kwargs.get(k, 1) != 1 for k in ("beta", "alpha")) or len(args) > 3
        if scaled or source.dim() != 2 or bias_name not in self._free_tensors \
                or bias.shape != (weight.shape[1],) or not bias_name.startswith(module_path):
            raise UnsupportedModelError(
                f"operator 'addmm' in {self._where_text()} uses parameter '{weight_name}' in a "
                "way the graph cannot represent (only addmm(own bias [out], x [N, in], own "
                "weight [in, out]) with alpha = beta = 1 is a linear layer)")
        used = {weight_name, bias_name}
        if used & self.scale_params:
            raise UnsupportedModelError(
                f"operator 'addmm' in {self._where_text()} reuses parameters {sorted(used)}; "
                "the graph cannot represent one weight at two places")
        out = func(*args, **kwargs)
        planes = functional_linear(
            self.builder, module_path, weight_name, self._free_tensors[weight_name], bias_name,
            self._free_tensors[bias_name], source, out,
            self.owner_type.get(weight_name, "addmm"))
        self.scale_params.update(used)
        set_planes(out, planes)
        return out

    def _check_parameters(self, name: str, tensors: list) -> list[str]:
        """Refuse parameter uses the graph cannot represent; return free parameters used."""
        free = []
        for tensor in tensors:
            param = self._parameter_name(tensor)
            if param is None:
                continue
            if param in self.layer_param_names:
                raise UnsupportedModelError(
                    f"operator '{name}' in {self._where_text()} uses parameter '{param}' "
                    "outside its own layer's forward call (weight tying or a functional call); "
                    "the graph cannot represent a shared weight"
                )
            free.append(param)
        if free and not (
            name in DATA_MOVEMENT or name in CASTS or name in CONCAT
            or BINARY.get(name) in ("add", "sub", "mul")  # mul: see `_scale`
        ):
            param = free[0]
            raise UnsupportedModelError(
                f"operator '{name}' in {self._where_text()} uses parameter '{param}' of a "
                f"{self.owner_type.get(param, 'module')} the graph converter does not know; "
                "supported are Conv/ConvTranspose/Linear/Embedding/MultiheadAttention/norm "
                "layers, and free parameters only added to or concatenated with activations "
                "(class tokens, positional embeddings)"
            )
        self.used_free_params.update(free)
        return free

    # ------------------------------------------------------------------------------------
    def _propagate(self, name, func, args, kwargs, flat_in, out, flat_out):
        if name in FACTORIES:
            return
        if name in CONCAT:
            self._concat(name, args, kwargs, flat_out[0])
        elif name in BINARY and self._binary(name, args, kwargs, flat_out):
            pass
        elif name in DATA_MOVEMENT:
            self._data_movement(name, func, args, kwargs, out)
        elif name in REDUCTIONS and self._reduction(args, kwargs, flat_in[0], flat_out):
            pass
        elif name in MATMUL and len(flat_in) == 2:
            left, right = (args[0], args[1])
            self._matmul(left, right, flat_out[0])
            heads = self._couple_matmul(_coupling_planes(left), left.shape,
                                        _coupling_planes(right), right.shape)
            setattr(flat_out[0], COUPLE_ATTR, heads)
        elif name == "einsum":
            self._einsum(args, flat_in, flat_out[0])
        elif name == "scaled_dot_product_attention":
            query, key, value = (args[i] if len(args) > i else kwargs[n]
                                 for i, n in enumerate(("query", "key", "value")))
            self._matmul(None, value, flat_out[0])
            key_t = [p.transpose(-2, -1) for p in _coupling_planes(key)]
            scores_shape = (*query.shape[:-1], key.shape[-2])
            heads = self._couple_matmul(_coupling_planes(query), query.shape, key_t,
                                        (*key.shape[:-2], key.shape[-1], key.shape[-2]))
            heads = self._couple_matmul(heads, scores_shape, _coupling_planes(value), value.shape)
            setattr(flat_out[0], COUPLE_ATTR, heads)
        else:
            self._generic(name, flat_in[0], flat_out)

    def _data_movement(self, name, func, args, kwargs, out):
        source = args[0]
        planes = planes_of(source)
        if not planes:
            return
        if name == "pad":
            kwargs = dict(kwargs)
            mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
            args = args[:3]
            if mode == "constant":
                kwargs["value"] = -1.0  # padded entries belong to no channel
        out_leaves, out_spec = tree_flatten(out)
        per_output = [[] for _ in out_leaves]
        for plane in planes:
            # float64 is exact for node ids and accepted by more operators than int64
            full = expand_full(plane, source.shape).double()
            if name in ("T", "mT"):
                moved = full.T if name == "T" else full.mT
            else:
                moved = func(full, *args[1:], **kwargs)
            moved_leaves = tree_flatten(moved)[0]
            for index, (o, m) in enumerate(zip(out_leaves, moved_leaves)):
                if isinstance(o, torch.Tensor) and isinstance(m, torch.Tensor) and m.dim():
                    per_output[index].append(compress(m.round().long()))
        for o, planes_out in zip(out_leaves, per_output):
            if isinstance(o, torch.Tensor):
                set_planes(o, planes_out)
        if name in SPLITTING:
            for plane in (p for leaf in per_output for p in leaf):
                varying = signature(plane)
                if len(varying) > 1:  # one channel axis became ([3,] heads, head_dim)
                    per_head = plane.reshape(-1, plane.shape[varying[-1]])
                    self.builder.couple(per_head[:, :1], per_head)

    def _concat(self, name, args, kwargs, out):
        tensors = list(args[0] if args else kwargs["tensors"])
        # torch.cat skips 1-d empty tensors (an empty key/value cache) whatever their rank
        tensors = [t for t in tensors if not (t.dim() == 1 and t.numel() == 0)]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if name == "stack":
            dim = dim % (tensors[0].dim() + 1)
            tensors = [t.unsqueeze(dim) for t in tensors]
            # unsqueezed copies lose attributes: re-attach the planes
            for t, original in zip(tensors, args[0] if args else kwargs["tensors"]):
                set_planes(t, [p.unsqueeze(dim) for p in planes_of(original)])
        dim = dim % out.dim()
        by_sig: dict[tuple, list] = {}
        for t in tensors:
            for plane in planes_of(t):
                by_sig.setdefault(signature(plane), []).append(None)
        result = []
        for sig in by_sig:
            donor = next(p for t in tensors for p in planes_of(t) if signature(p) == sig)
            parts = []
            for t in tensors:
                own = [p for p in planes_of(t) if signature(p) == sig]
                if own:
                    parts.append(expand_full(own[0], t.shape))
                elif dim not in sig:
                    parts.append(expand_full(donor, t.shape))
                else:
                    parts.append(torch.full(tuple(t.shape), -1, dtype=torch.long))
            result.append(compress(torch.cat(parts, dim)))
        set_planes(out, result)

    def _binary(self, name, args, kwargs, flat_out) -> bool:
        operands = list(args[1:3]) if name == "where" else list(args[:2])
        if len(operands) < 2 and "other" in kwargs:
            operands.append(kwargs["other"])
        operands = [o for o in operands if isinstance(o, torch.Tensor)]
        out = flat_out[0]
        scales = [o for o in operands if self._parameter_name(o)]
        if BINARY[name] == "mul" and scales:
            data = [o for o in operands if not self._parameter_name(o)]
            self._scale(name, scales[0], data[0], out)
            return True
        ndim = out.dim()
        if ndim == 0:
            return True
        groups: dict[tuple, list] = {}
        for operand in operands:
            for plane in planes_of(operand):
                plane = pad_left(plane, ndim)
                groups.setdefault(signature(plane), []).append(plane)
        result = []
        for sig, planes in groups.items():
            merged = planes[0]
            for other in planes[1:]:
                if other.shape == merged.shape and torch.equal(other, merged):
                    continue
                merged = self.builder.merge(merged, other, BINARY[name], self.where)
            result.append(merged)
        set_planes(out, result)
        return True

    def _scale(self, name, scale, data, out):
        """``x * gamma`` with a free per-channel parameter (layer scale): new channels whose
        ``scale`` slot holds gamma, one identity edge from each channel of x."""
        param = self._parameter_name(scale)
        ndim = out.dim()
        shape = (1,) * (ndim - scale.dim()) + tuple(scale.shape)
        axes = [axis for axis, size in enumerate(shape) if size > 1]
        tensor = self._free_tensors.get(param)
        labels = None
        if len(axes) == 1 and data.dim() == ndim:
            labels = channel_labels_of(data, axes[0])
        same_memory = (
            tensor is not None and scale.numel() == tensor.numel() and scale.is_contiguous()
            and scale.data_ptr() == tensor.data_ptr()
        )
        if param in self.scale_params:
            raise UnsupportedModelError(
                f"parameter '{param}' scales activations twice (second time in "
                f"{self._where_text()}); the graph cannot represent one weight at two places"
            )
        if labels is None or not same_memory or torch.unique(labels).numel() != labels.numel():
            raise UnsupportedModelError(
                f"operator '{name}' in {self._where_text()} multiplies activations by parameter "
                f"'{param}'; the graph represents this only for one value per channel of a "
                "traced channel axis (layer scale)"
            )
        builder = self.builder
        layer = builder.add_layer(f"{param}:scale", "merge_mul", "scale", labels.numel())
        nodes = builder.nodes_of(layer)
        builder.add_identity_edges(layer, labels, nodes)
        builder.add_slot(layer, param, tensor.reshape(-1), nodes, "scale")
        self.used_free_params.discard(param)
        self.scale_params.add(param)
        kept = [pad_left(p, ndim) for p in planes_of(data) if signature(p) != (axes[0],)]
        set_planes(out, kept + [along(ndim, axes[0], nodes)])

    def _reduction(self, args, kwargs, source, flat_out) -> bool:
        dims = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis"))
        if isinstance(dims, torch.Tensor):
            return False  # binary max/min: handled as a generic elementwise op
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        if dims is None or source.dim() == 0:
            return True  # reduced to a scalar: no channels left
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = sorted({d % source.dim() for d in dims})
        kept = []
        for plane in planes_of(source):
            if any(plane.shape[d] > 1 for d in dims):
                continue
            if not keepdim:
                plane = plane.reshape([s for a, s in enumerate(plane.shape) if a not in dims])
            kept.append(plane)
        for o in flat_out:
            if o.dim() == (source.dim() if keepdim else source.dim() - len(dims)):
                set_planes(o, [p for p in kept if p.dim() == o.dim()])
        return True

    def _matmul(self, left, right, out):
        ndim = out.dim()
        kept = []
        if left is not None and left.dim() >= 2:
            kept += [pad_left(p, ndim) for p in planes_of(left) if p.shape[-1] == 1]
        if right is not None and right.dim() >= 2:
            kept += [pad_left(p, ndim) for p in planes_of(right) if p.shape[-2] == 1]
        set_planes(out, [p for p in kept if p.dim() == ndim])

    def _couple_matmul(self, left_planes, left_shape, right_planes, right_shape) -> list:
        """Coupling a matrix product imposes on channels (the pruner's, not the graph's).

        Along the contracted axis, channel k of the left operand meets channel k of the right
        one (a query's and a key's head dimension): they are removed together, and a channel
        contracted with a tensor of no channel (a constant) is pinned. Along a batch axis (the
        attention heads), everything at index h of both operands goes together; the result
        carries one label per index of such an axis, so the next product (scores @ values)
        couples the value heads too. Returns those head-label planes of the result.
        """
        if len(left_shape) < 2 or len(right_shape) < 2:
            return []
        batch = torch.broadcast_shapes(tuple(left_shape[:-2]), tuple(right_shape[:-2]))
        nb = len(batch)
        full_left = [_full(p, left_shape, nb, batch) for p in left_planes]
        full_right = [_full(p, right_shape, nb, batch) for p in right_planes]
        contracted_left = [p[..., 0, :] for p in full_left if p.shape[-1] > 1
                           and _varies(p, -1)]
        contracted_right = [p[..., :, 0] for p in full_right if p.shape[-2] > 1
                            and _varies(p, -2)]
        for a in contracted_left:
            for b in contracted_right:
                self.builder.couple(a, b)
        if bool(contracted_left) != bool(contracted_right):
            for plane in contracted_left + contracted_right:
                self.builder.pin(plane)
        heads = []
        for axis in range(nb):
            reps = []
            for plane in full_left + full_right:
                if not _varies(plane, axis):
                    continue
                per_index = plane.movedim(axis, 0).reshape(plane.shape[axis], -1)
                self.builder.couple(per_index[:, :1], per_index)
                reps.append(per_index[:, 0])
            for other in reps[1:]:
                self.builder.couple(reps[0], other)
            if reps:
                heads.append(along(nb + 2, axis, reps[0]))
                self.builder.head_splits.append((self.where, reps[0]))
        return heads

    def _einsum(self, args, operands, out):
        """Planes whose varying axes all survive into the output move to their output axes."""
        equation = args[0].replace(" ", "")
        if "->" not in equation or "." in equation:
            self._generic("einsum", operands[0], [out])  # implicit output or ellipsis
            return
        inputs, output = equation.split("->")
        result = []
        for subscripts, operand in zip(inputs.split(","), operands):
            for plane in planes_of(operand):
                varying = signature(plane)
                letters = [subscripts[axis] for axis in varying]
                if not all(letter in output for letter in letters):
                    continue  # a contracted axis: the channel does not reach the output
                moved = plane.reshape([plane.shape[axis] for axis in varying])
                order = sorted(range(len(letters)), key=lambda i: output.index(letters[i]))
                shape = [1] * len(output)
                for i in order:
                    shape[output.index(letters[i])] = plane.shape[varying[i]]
                result.append(moved.permute(order).reshape(shape))
        set_planes(out, result)

    def _generic(self, name, source, flat_out):
        planes = planes_of(source)
        for o in flat_out:
            if o is source:
                continue
            if o.shape == source.shape:
                set_planes(o, planes)
                continue
            if o.dim() == source.dim():
                kept = [
                    p for p in planes
                    if all(source.shape[a] == o.shape[a] for a in signature(p))
                ]
            else:
                kept = []
            set_planes(o, kept)
            if len(kept) < len(planes):
                setattr(
                    o, POISON_ATTR,
                    f"operator '{name}' in {self._where_text()} (it changes the size of a "
                    "channel axis in a way the converter cannot follow)",
                )


def _coupling_planes(tensor) -> list:
    return list(planes_of(tensor)) + list(getattr(tensor, COUPLE_ATTR, ()))


def _full(plane, shape, num_batch, batch) -> torch.Tensor:
    """A plane of a matmul operand at full size, batch axes broadcast to `batch`."""
    plane = expand_full(pad_left(plane, len(shape)), shape)
    lead = plane.shape[:-2]
    plane = plane.reshape((1,) * (num_batch - len(lead)) + tuple(plane.shape))
    return plane.expand(*batch, *plane.shape[-2:])


def _varies(plane, axis) -> bool:
    if plane.shape[axis] <= 1:
        return False
    first = plane.narrow(axis, 0, 1)
    return not bool((plane == first).all())


def _carry_head_labels(flat_in, flat_out):
    """Head labels of attention scores survive elementwise steps (mask, softmax, dropout)."""
    labelled = [t for t in flat_in if getattr(t, COUPLE_ATTR, None)]
    if not labelled:
        return
    for o in flat_out:
        kept = [p for t in labelled for p in getattr(t, COUPLE_ATTR)
                if p.dim() == o.dim() and all(o.shape[a] == p.shape[a] for a in signature(p))]
        if kept and not getattr(o, COUPLE_ATTR, None):
            setattr(o, COUPLE_ATTR, kept)
