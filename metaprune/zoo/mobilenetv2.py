"""`mobilenetv2`: inverted residual blocks (1×1 expand, 3×3 depthwise, 1×1 linear projection)."""

import torch
from torch import nn

from metaprune.zoo.config import ConfigReader, Family, as_int, as_list, as_record, fail
from metaprune.zoo.layers import ConvNormAct, global_avg_pool

BLOCK_FIELDS = ("hidden", "out", "stride", "residual")

# (expansion t, output width c, repeats n, first stride s) as in the MobileNetV2 paper,
# shortened, and with the stem stride dropped so 28×28 and 32×32 inputs end on a 4×4 map.
DEFAULT_LAYOUT = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 1, 1))


class InvertedResidual(nn.Module):
    """1×1 expand → 3×3 depthwise (stride) → 1×1 linear projection, plus x when residual.

    `residual` is part of the architecture, not derived from the widths at run time: after
    pruning two unequal widths may coincide, and that must not add a skip connection.
    """

    def __init__(self, in_width: int, hidden: int, out_width: int, stride: int, residual: bool):
        # in_width, out_width: block input and output widths.
        # hidden: the expanded width, shared by the expand output and the depthwise conv (0 in
        #   a residual block: the branch was emptied by depth pruning, `metaprune.zoo.build`
        #   replaces its empty layers and the block adds the projection's BatchNorm shift).
        # stride: of the depthwise conv.
        # residual: add the input to the output (needs stride 1 and in_width == out_width).
        super().__init__()
        self.residual = residual
        self.expand = ConvNormAct(2, in_width, hidden, 1, activation="relu6")
        # groups=0 is no convolution PyTorch builds; a 0-channel one has no weights either way
        self.depthwise = ConvNormAct(
            2, hidden, hidden, 3, stride=stride, groups=max(hidden, 1), activation="relu6"
        )
        self.project = ConvNormAct(2, hidden, out_width, 1, activation=None)

    def forward(self, x):
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images: stem, inverted residual blocks, 1×1 conv, pool, Linear.

    Example::

        config = {"input_shape": [3, 32, 32], "stem_width": 16, "last_width": 64,
                  "blocks": [{"hidden": 48, "out": 24, "stride": 2},
                             {"hidden": 96, "out": 24}]}      # the 2nd block is residual
        model = build("mobilenetv2", config)
        model(torch.randn(8, 3, 32, 32)).shape   # (8, 10)
    """

    def __init__(
        self,
        *,
        input_shape: list[int],
        num_classes: int,
        stem_width: int,
        stem_stride: int,
        blocks: list[dict],
        last_width: int,
    ):
        # input_shape: (channels, height, width).
        # stem_width, stem_stride: the first 3×3 conv.
        # blocks: one dict per block with "hidden", "out", "stride", "residual".
        # last_width: the 1×1 conv before the global pool.
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.stem = ConvNormAct(
            2, input_shape[0], stem_width, stride=stem_stride, activation="relu6"
        )
        layers = []
        in_width = stem_width
        for block in blocks:
            layers.append(
                InvertedResidual(
                    in_width, block["hidden"], block["out"], block["stride"], block["residual"]
                )
            )
            in_width = block["out"]
        self.blocks = nn.Sequential(*layers)
        self.last = ConvNormAct(2, in_width, last_width, 1, activation="relu6")
        self.pool = global_avg_pool(2)
        self.classifier = nn.Linear(last_width, num_classes)

    def forward(self, x):
        x = self.last(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))

    def read_config(self) -> dict:
        return {
            "input_shape": [self.stem.conv.in_channels, *self.input_shape[1:]],
            "num_classes": self.classifier.out_features,
            "stem_width": self.stem.out_channels,
            "stem_stride": self.stem.conv.stride[0],
            "blocks": [
                {
                    "hidden": block.expand.out_channels,
                    "out": block.project.out_channels,
                    "stride": block.depthwise.conv.stride[0],
                    "residual": block.residual,
                }
                for block in self.blocks
            ],
            "last_width": self.last.out_channels,
        }


def default_blocks(stem_width: int) -> list[dict]:
    blocks, in_width = [], stem_width
    for expansion, out, repeats, stride in DEFAULT_LAYOUT:
        for i in range(repeats):
            first_stride = stride if i == 0 else 1
            blocks.append({"hidden": expansion * in_width, "out": out, "stride": first_stride})
            in_width = out
    return blocks


def complete(reader: ConfigReader) -> dict:
    stem_width = reader.integer("stem_width", 32)
    stem_stride = reader.integer("stem_stride", 1, high=2)
    where = reader.where("blocks")
    blocks, in_width = [], stem_width
    for i, raw in enumerate(as_list(reader.raw("blocks", default_blocks(stem_width)), where)):
        block = as_record(raw, f"{where}[{i}]", BLOCK_FIELDS)
        if "out" not in block:
            fail(f"{where}[{i}]", "needs an 'out' width", block)
        out = as_int(block["out"], f"{where}[{i}].out")
        stride = as_int(block.get("stride", 1), f"{where}[{i}].stride", high=2)
        shape_kept = stride == 1 and in_width == out
        residual = block.get("residual", shape_kept)
        if not isinstance(residual, bool) or (residual and not shape_kept):
            fail(
                f"{where}[{i}].residual",
                f"must be a bool, true only with stride 1 and equal widths (in {in_width}, "
                f"out {out}, stride {stride})",
                residual,
            )
        # a hidden width of 0 empties the branch (depth pruning): only a residual block still
        # passes its input on, any other would make the model's output a constant
        hidden = as_int(
            block.get("hidden", 6 * in_width), f"{where}[{i}].hidden", low=0 if residual else 1
        )
        blocks.append({"hidden": hidden, "out": out, "stride": stride, "residual": residual})
        in_width = out
    last_width = reader.integer("last_width", 256)
    return {
        "stem_width": stem_width,
        "stem_stride": stem_stride,
        "blocks": blocks,
        "last_width": last_width,
    }


FAMILY = Family(
    id="mobilenetv2",
    module_class=MobileNetV2,
    keys=("stem_width", "stem_stride", "blocks", "last_width"),
    spatial_dims=(2,),
    default_input_shape=(3, 32, 32),
    complete=complete,
    read=MobileNetV2.read_config,
)
