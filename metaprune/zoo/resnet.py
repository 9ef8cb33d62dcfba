"""`resnet`: CIFAR-style BasicBlock ResNet (depth 6n + 2) in 1-D or 2-D.

Three stages of n BasicBlocks each; stages 2 and 3 halve the resolution. The stage width is the
residual stream, coupled across the stem (for stage 1) and every block output of its stage, so it
is one number per stage; each block's inner width (conv1's output) is free.
"""

import torch
from torch import nn

from metaprune.zoo.config import MAX_LAYERS, ConfigReader, Family, as_int_list, as_list
from metaprune.zoo.layers import ConvNormAct, conv, dims_of, global_avg_pool, norm

STAGE_STRIDES = (1, 2, 2)


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), shortcut a 1×1 conv + BN if needed."""

    def __init__(self, dims: int, in_width: int, inner: int, out_width: int, stride: int):
        # dims: 1 or 2 (Conv1d or Conv2d).
        # in_width, out_width: residual stream widths before and after the block.
        # inner: conv1's output width, free to prune independently (0: the branch is a
        #   constant, `metaprune.zoo.build` replaces its empty layers).
        # stride: of conv1 and the shortcut; a projection shortcut appears when the shape changes.
        super().__init__()
        self.conv1 = conv(dims, in_width, inner, 3, stride=stride)
        self.bn1 = norm(dims, inner)
        self.conv2 = conv(dims, inner, out_width, 3)
        self.bn2 = norm(dims, out_width)
        if stride != 1 or in_width != out_width:
            self.shortcut = nn.Sequential(
                conv(dims, in_width, out_width, 1, stride=stride), norm(dims, out_width)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-20/32/56/... for small inputs: 3×3 stem, three stages, global pool, Linear.

    Example::

        model = build("resnet", {"input_shape": [1, 28, 28], "depth": 20})   # ResNet-20
        wide = build("resnet", {"depth": 20, "stage_widths": [160, 320, 640]})  # ~27 M params
        model(torch.randn(8, 1, 28, 28)).shape   # (8, 10)
    """

    def __init__(
        self,
        *,
        input_shape: list[int],
        num_classes: int,
        dims: int,
        depth: int,
        stage_widths: list[int],
        block_widths: list[list[int]],
    ):
        # input_shape: (channels, length) for dims 1, (channels, height, width) for dims 2.
        # dims: 1 (Conv1d) or 2 (Conv2d); must match the input's spatial dimensions.
        # depth: 6n + 2 layers, n BasicBlocks per stage (20, 32, 56, 110 are the classic ones);
        #   the blocks themselves come from block_widths, which `build` checks against depth.
        # stage_widths: the residual width of each of the three stages (the stem has stage 1's).
        # block_widths: per stage, the inner width of each of its n blocks (0: emptied).
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.stem = ConvNormAct(dims, input_shape[0], stage_widths[0])
        stages = []
        in_width = stage_widths[0]
        for width, inners, stride in zip(stage_widths, block_widths, STAGE_STRIDES, strict=True):
            blocks = []
            for i, inner in enumerate(inners):
                blocks.append(BasicBlock(dims, in_width, inner, width, stride if i == 0 else 1))
                in_width = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = global_avg_pool(dims)
        self.fc = nn.Linear(in_width, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))

    def read_config(self) -> dict:
        return {
            "input_shape": [self.stem.conv.in_channels, *self.input_shape[1:]],
            "num_classes": self.fc.out_features,
            "dims": dims_of(self.stem.conv),
            "depth": 6 * len(self.stages[0]) + 2,
            "stage_widths": [stage[-1].conv2.out_channels for stage in self.stages],
            "block_widths": [
                [block.conv1.out_channels for block in stage] for stage in self.stages
            ],
        }


def complete(reader: ConfigReader) -> dict:
    dims = reader.integer("dims", len(reader.input_shape) - 1, high=2)
    if dims != len(reader.input_shape) - 1:
        reader.fail("dims", f"must match input_shape {reader.input_shape}", dims)
    depth = reader.integer("depth", 20, low=8, high=6 * MAX_LAYERS // 3 + 2)
    if (depth - 2) % 6:
        reader.fail("depth", "must be 6n + 2 (e.g. 20, 32, 56, 110)", depth)
    blocks = (depth - 2) // 6
    stage_widths = reader.integers("stage_widths", [16, 32, 64], length=3)
    default_blocks = [[width] * blocks for width in stage_widths]
    where = reader.where("block_widths")
    per_stage = as_list(reader.raw("block_widths", default_blocks), where, length=3)
    # an inner width of 0: the block's residual branch was emptied (depth pruning), the block
    # adds a constant to its stream
    block_widths = [
        as_int_list(inners, f"{where}[{i}]", low=0, length=blocks)
        for i, inners in enumerate(per_stage)
    ]
    return {
        "dims": dims,
        "depth": depth,
        "stage_widths": stage_widths,
        "block_widths": block_widths,
    }


FAMILY = Family(
    id="resnet",
    module_class=ResNet,
    keys=("dims", "depth", "stage_widths", "block_widths"),
    spatial_dims=(1, 2),
    default_input_shape=(3, 32, 32),
    complete=complete,
    read=ResNet.read_config,
)
