"""Layers left with no channels on one side, replaced by what they compute: nothing or a constant.

Depth pruning empties a whole channel group (a residual branch's inner width): its producing
convolution keeps 0 output channels, the norm after it 0 features, and the consuming
convolution 0 input channels. PyTorch cannot run those modules (``Conv2d(16, 0, 3)`` and
``BatchNorm2d(0)`` raise in forward, ``Conv2d(0, 16, 3)`` returns 0 channels instead of 16),
although what they compute is well defined:

- a convolution with 0 output channels: an empty feature map of the output's spatial size;
- a convolution with 0 input channels: its bias (or zeros) at every output position, since
  every product it would sum is over an empty set;
- a norm over 0 features: the empty tensor it is given.

`collapse_empty_layers` swaps each such module for `EmptyConv` or `nn.Identity`, which compute
exactly that and cost no multiply-accumulates. The pruning engine applies it after every
removal, and `metaprune.zoo.build` after building a config with zero widths, so a depth-pruned
zoo model saves and loads through ``.safetensors`` + spec like any other.

Example::

    block = nn.Sequential(nn.Conv2d(16, 0, 3, padding=1), nn.BatchNorm2d(0), nn.ReLU(),
                          nn.Conv2d(0, 16, 3, padding=1), nn.BatchNorm2d(16))
    collapse_empty_layers(block)       # Sequential(EmptyConv, Identity, ReLU, EmptyConv, BN)
    block.eval()(torch.randn(2, 16, 8, 8))   # bn(0): the BatchNorm's shift at every position
"""

import torch
from torch import nn

# norms whose only state is per-feature: with 0 features they pass their (empty) input on
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


class EmptyConv(nn.Module):
    """A convolution with 0 input or 0 output channels: its bias (or zeros) broadcast to the
    output's shape, or an empty output. Keeps the convolution's shape attributes, so code that
    reads ``out_channels`` / ``in_channels`` (a zoo config) still can.

    Args:
        conv: the convolution it replaces (its geometry and bias are copied).
    """

    def __init__(self, conv: nn.modules.conv._ConvNd) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.dilation, self.groups = tuple(conv.dilation), conv.groups
        self.padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        # no output channels: nothing to add a bias to
        self.bias = None if conv.bias is None or conv.out_channels == 0 else nn.Parameter(
            conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)

    def _spatial(self, sizes) -> list[int]:
        if self.padding == "same":
            return list(sizes)
        padding = (0,) * len(sizes) if self.padding == "valid" else self.padding
        return [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
                zip(sizes, self.kernel_size, self.stride, padding, self.dilation)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = len(self.kernel_size)
        shape = [*x.shape[:-dims - 1], self.out_channels, *self._spatial(x.shape[-dims:])]
        if self.bias is None:
            return x.new_zeros(shape)
        # a real tensor, not a broadcast view: code after it may write in place
        return self.bias.view(-1, *[1] * dims).to(x.dtype).expand(shape).contiguous()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, bias={self.bias is not None}")


def _empty_replacement(module: nn.Module) -> nn.Module | None:
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and (
            module.weight.shape[0] == 0 or module.weight.shape[1] == 0):
        return EmptyConv(module)
    if isinstance(module, _NORMS):
        reference = module.weight if getattr(module, "weight", None) is not None else \
            getattr(module, "running_mean", None)
        if reference is not None and reference.numel() == 0:
            return nn.Identity()
    return None


def collapse_empty_layers(model: nn.Module) -> nn.Module:
    """Replaces, in place, every convolution with 0 input or output channels by `EmptyConv` and
    every norm over 0 features by `nn.Identity`; returns `model`. Outputs are unchanged where
    the originals would run, and defined where they would raise."""
    for name, module in list(model.named_modules()):
        replacement = _empty_replacement(module) if name else None
        if replacement is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    return model


def has_empty_layers(model: nn.Module) -> bool:
    """Whether `model` holds a layer `collapse_empty_layers` put there (a group emptied)."""
    return any(isinstance(m, EmptyConv) for m in model.modules())
