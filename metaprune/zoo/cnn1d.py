"""`cnn1d`: a Conv1d stack (conv → BN → ReLU → max-pool) with a pooled or flattened head."""

import torch
from torch import nn

from metaprune.zoo.config import MAX_KERNEL, ConfigReader, Family
from metaprune.zoo.layers import ConvNormAct, classifier, classifier_widths, max_pool


class ConvStage(nn.Module):
    """One layer of the stack: ConvNormAct, then max-pooling by `pool` (1 = none)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, pool: int):
        super().__init__()
        self.unit = ConvNormAct(1, in_channels, out_channels, kernel)
        self.pool = max_pool(1, pool) if pool > 1 else nn.Identity()

    def forward(self, x):
        return self.pool(self.unit(x))


class CNN1d(nn.Module):
    """Conv1d layers with per-layer widths, kernels and pooling, then a classifier.

    `head="gap"` averages over the length before the classifier; `head="flatten"` feeds the
    flattened (channels × length) features to it: the flatten→Linear coupling pruning handles.

    Example::

        model = build("cnn1d", {"input_shape": [1, 40], "widths": [16, 32], "head": "flatten"})
        model(torch.randn(8, 1, 40)).shape   # (8, 10)
    """

    def __init__(
        self,
        *,
        input_shape: list[int],
        num_classes: int,
        widths: list[int],
        kernel_sizes: list[int],
        pools: list[int],
        head: str,
        hidden: list[int],
    ):
        # input_shape: (channels, length).
        # widths, kernel_sizes, pools: one entry per conv layer (pool 1 = no pooling).
        # head: "gap" (global average pool) or "flatten".
        # hidden: widths of the classifier's hidden Linear layers (may be empty).
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.head_kind = head
        channels, length = input_shape
        stages = []
        for width, kernel, pool in zip(widths, kernel_sizes, pools, strict=True):
            stages.append(ConvStage(channels, width, kernel, pool))
            channels, length = width, length // pool
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool1d(1) if head == "gap" else nn.Identity()
        in_features = channels if head == "gap" else channels * length
        self.classifier = classifier(in_features, hidden, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    def read_config(self) -> dict:
        hidden, num_classes = classifier_widths(self.classifier)
        return {
            "input_shape": [self.features[0].unit.conv.in_channels, self.input_shape[1]],
            "num_classes": num_classes,
            "widths": [stage.unit.out_channels for stage in self.features],
            "kernel_sizes": [stage.unit.conv.kernel_size[0] for stage in self.features],
            "pools": [getattr(stage.pool, "kernel_size", 1) for stage in self.features],
            "head": self.head_kind,
            "hidden": hidden,
        }


def default_pools(length: int, layers: int) -> list[int]:
    """Halve the length after each layer while at least 4 positions remain."""
    pools = []
    for _ in range(layers):
        pools.append(2 if length >= 8 else 1)
        length //= pools[-1]
    return pools


def complete(reader: ConfigReader) -> dict:
    widths = reader.integers("widths", [32, 64, 64])
    layers = len(widths)
    kernel_sizes = reader.integers("kernel_sizes", [5] * layers, length=layers, high=MAX_KERNEL)
    if any(kernel % 2 == 0 for kernel in kernel_sizes):
        reader.fail("kernel_sizes", "must be odd (padding keeps the length)", kernel_sizes)
    length = reader.input_shape[1]
    pools = reader.integers("pools", default_pools(length, layers), length=layers, high=16)
    for i, pool in enumerate(pools):
        length //= pool
        if length < 1:
            reader.fail("pools", f"shrink the input length to 0 at layer {i}", pools)
    head = reader.choice("head", "gap", ("gap", "flatten"))
    hidden = reader.integers("hidden", [], min_length=0)
    return {
        "widths": widths,
        "kernel_sizes": kernel_sizes,
        "pools": pools,
        "head": head,
        "hidden": hidden,
    }


FAMILY = Family(
    id="cnn1d",
    module_class=CNN1d,
    keys=("widths", "kernel_sizes", "pools", "head", "hidden"),
    spatial_dims=(1,),
    default_input_shape=(1, 40),
    complete=complete,
    read=CNN1d.read_config,
)
