"""Analytic MACs/params of a model as a function of the channels each group keeps.

One traced pass (FlopCounterMode, per module) gives every parametrised layer's dense cost. A
layer's cost then scales with the fraction of input and output channels it keeps: a dense
convolution or Linear as kept_in·kept_out, a depthwise convolution, a norm layer or a bias as
kept_out, attention projections quadratically and attention matmuls linearly in the embedding
width. Everything not attributed to a layer stays constant. Evaluating the model is a few
hundred multiplications, so a target can be bisected without touching the network; the engine
then checks the physically pruned model with the real counter.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from metaprune.measure import count_macs, count_params
from metaprune.pruning.groups import ChannelGroup

# Attention score/value products: linear in the embedding width (the sequence length is fixed).
_LINEAR_IN_WIDTH_OPS = ("bmm", "baddbmm", "_scaled_dot_product")
# What a layer that is no nn.Linear/Conv computes when its cost scales with kept_in * kept_out.
_MATRIX_PRODUCT_OPS = ("addmm", "mm", "linear")


@dataclass
class UnitCost:
    """Dense cost of one layer split by how it scales.

    `*_both` scales with kept_in·kept_out (kept_out² for `tied` layers whose input and output
    channels are the same, as in attention and depthwise convolution); `*_out` with kept_out.
    """

    out_total: int | None
    in_total: int | None
    tied: bool
    macs_both: float = 0.0
    macs_out: float = 0.0
    params_both: float = 0.0
    params_out: float = 0.0

    def keeps(self, removed_in: float, removed_out: float) -> tuple[float, float]:
        """(kept fraction of the input channels, of the output channels)."""
        keep_out = 1.0 - removed_out / self.out_total if self.out_total else 1.0
        if self.tied:
            return keep_out, keep_out
        return (1.0 - removed_in / self.in_total if self.in_total else 1.0), keep_out

    def macs_at(self, keep_in: float, keep_out: float) -> float:
        return self.macs_both * keep_in * keep_out + self.macs_out * keep_out

    def params_at(self, keep_in: float, keep_out: float) -> float:
        return self.params_both * keep_in * keep_out + self.params_out * keep_out


def _per_module_macs(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> dict:
    """{module path: {op name: MACs}} of one batch-1 forward pass."""
    counter = FlopCounterMode(display=False)
    inputs = tuple(t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t
                   for t in example_inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(*inputs)
    finally:
        model.train(was_training)
    prefix = type(model).__name__
    result = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        path = "" if key == prefix else key[len(prefix) + 1:]
        result[path] = {str(op).split(".")[-1]: count / 2 for op, count in ops.items()}
    return result


def _unit_cost(DG, unit, macs_by_op: dict, own_params: dict[str, int]) -> UnitCost:
    out_total = DG.get_out_channels(unit) if unit in DG.module2node else None
    in_total = DG.get_in_channels(unit) if unit in DG.module2node else None
    total_macs = sum(macs_by_op.values())
    if isinstance(unit, nn.Parameter):
        return UnitCost(out_total, in_total, False, params_out=unit.numel())
    if isinstance(unit, nn.MultiheadAttention):
        linear_macs = sum(v for op, v in macs_by_op.items()
                          if any(op.startswith(p) for p in _LINEAR_IN_WIDTH_OPS))
        weights = sum(n for name, n in own_params.items() if name.endswith("weight"))
        return UnitCost(out_total, in_total, True, macs_both=total_macs - linear_macs,
                        macs_out=linear_macs, params_both=weights,
                        params_out=sum(own_params.values()) - weights)
    if isinstance(unit, (nn.modules.conv._ConvNd, nn.Linear)):
        weight = own_params.get("weight", 0)
        rest = sum(own_params.values()) - weight
        depthwise = isinstance(unit, nn.modules.conv._ConvNd) and unit.groups > 1
        if depthwise:
            return UnitCost(out_total, in_total, True, macs_out=total_macs,
                            params_out=weight + rest)
        return UnitCost(out_total, in_total, False, macs_both=total_macs, params_both=weight,
                        params_out=rest)
    if in_total and out_total and any(op.startswith(_MATRIX_PRODUCT_OPS) for op in macs_by_op):
        # a functional linear on the module's own weight (GPT-2's Conv1D computes addmm)
        weight = own_params.get("weight", 0)
        return UnitCost(out_total, in_total, False, macs_both=total_macs, params_both=weight,
                        params_out=sum(own_params.values()) - weight)
    return UnitCost(out_total, in_total, False, macs_out=total_macs,
                    params_out=sum(own_params.values()))


class CostModel:
    """MACs and params of a model after removing channels from its groups.

    Args:
        model: the dense model (traced into `DG`).
        example_inputs: inputs of one forward pass.
        DG: its `tp.DependencyGraph`.
        groups: its channel groups.

    Example::

        cost = CostModel(model, example_inputs, DG, groups)
        cost.set_orders([torch.arange(g.size) for g in groups])
        macs, params = cost.evaluate([0] * len(groups))   # == the dense model
    """

    def __init__(self, model: nn.Module, example_inputs, DG, groups: list[ChannelGroup]) -> None:
        self.groups = groups
        self.macs_before = count_macs(model, example_inputs)
        self.params_before = count_params(model)
        macs = _per_module_macs(model, example_inputs)
        unit_names = {use.unit for group in groups for use in group.uses}
        named = dict(model.named_modules())
        named_params = dict(model.named_parameters())
        self.units: dict[str, UnitCost] = {}
        # Parameters and MACs of nested units (e.g. a Linear inside a custom block that is itself
        # a unit) are counted once, by the innermost unit.
        for name in unit_names:
            unit = named.get(name, named_params.get(name))
            if isinstance(unit, nn.Parameter):
                self.units[name] = _unit_cost(DG, unit, {}, {})
                continue
            nested = [other for other in unit_names
                      if other != name and other.startswith(f"{name}.") and other in named]
            own_params = {
                key: p.numel() for key, p in unit.named_parameters()
                if not any(f"{name}.{key}".startswith(f"{other}.") for other in nested)
            }
            own_macs = dict(macs.get(name, {}))
            for other in nested:
                for op, value in macs.get(other, {}).items():
                    own_macs[op] = own_macs.get(op, 0.0) - value
            self.units[name] = _unit_cost(DG, unit, own_macs, own_params)
        self.constant_macs = self.macs_before - sum(u.macs_both + u.macs_out
                                                    for u in self.units.values())
        self.constant_params = self.params_before - sum(u.params_both + u.params_out
                                                        for u in self.units.values())
        self._cumulative: list[list[tuple[str, str, torch.Tensor]]] = []

    def set_orders(self, orders: list[torch.Tensor]) -> None:
        """Fixes the removal order of every group (least important root channel first)."""
        self._cumulative = []
        for group, order in zip(self.groups, orders):
            uses = []
            for use in group.uses:
                cumulative = torch.zeros(group.size + 1, dtype=torch.float64)
                cumulative[1:] = torch.cumsum(use.multiplicity[order].double(), 0)
                uses.append((use.unit, use.side, cumulative))
            self._cumulative.append(uses)

    def evaluate(self, removed: Sequence[int]) -> tuple[float, float]:
        """(MACs, params) when group i loses its first `removed[i]` channels of its order."""
        macs, params = self.constant_macs, self.constant_params
        for name, keep in self.unit_keeps(removed).items():
            macs += self.units[name].macs_at(*keep)
            params += self.units[name].params_at(*keep)
        return macs, params

    def unit_keeps(self, removed: Sequence[int]) -> dict[str, tuple[float, float]]:
        """Unit name -> (kept fraction of its input channels, of its output channels)."""
        removed_out: dict[str, float] = {}
        removed_in: dict[str, float] = {}
        for count, uses in zip(removed, self._cumulative):
            if count == 0:
                continue
            for unit, side, cumulative in uses:
                target = removed_out if side == "out" else removed_in
                target[unit] = target.get(unit, 0.0) + float(cumulative[count])
        return {name: unit.keeps(removed_in.get(name, 0.0), removed_out.get(name, 0.0))
                for name, unit in self.units.items()}
