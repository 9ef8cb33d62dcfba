"""`densenet`: DenseNet-BC for small images: dense blocks that concatenate, and transitions.

Each dense layer is BN-ReLU-1×1 conv (its bottleneck `width`) then BN-ReLU-3×3 conv (its
`growth`), and its output is concatenated to its input; a transition is BN-ReLU-1×1 conv-avgpool.
Every width is per layer, so a pruned DenseNet (fewer channels in any layer, growth included) is
again a config of the family.
"""

import torch
from torch import nn

from metaprune.zoo.config import ConfigReader, Family, as_int, as_list, as_record, fail
from metaprune.zoo.layers import avg_pool, conv, global_avg_pool, norm

LAYER_FIELDS = ("width", "growth")


class DenseLayer(nn.Module):
    """cat([x, conv2(relu(bn2(conv1(relu(bn1(x))))))], channels)."""

    def __init__(self, in_width: int, width: int, growth: int):
        # in_width: channels of the concatenated input so far.
        # width: bottleneck (1×1 conv) output channels; growth: channels this layer adds.
        #   Either may be 0 (depth pruning emptied it; the concatenation still passes x on):
        #   `metaprune.zoo.build` replaces the layers left without channels.
        super().__init__()
        self.bn1 = norm(2, in_width)
        self.conv1 = conv(2, in_width, width, 1)
        self.bn2 = norm(2, width)
        self.conv2 = conv(2, width, growth, 3)

    def forward(self, x):
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    """BN → ReLU → 1×1 conv → 2×2 average pool between dense blocks."""

    def __init__(self, in_width: int, out_width: int):
        super().__init__()
        self.bn = norm(2, in_width)
        self.conv = conv(2, in_width, out_width, 1)
        self.pool = avg_pool(2, 2)

    def forward(self, x):
        return self.pool(self.conv(torch.relu(self.bn(x))))


class DenseNet(nn.Module):
    """Stem conv, dense blocks separated by transitions, BN-ReLU, global pool, Linear.

    Example::

        config = {"input_shape": [1, 28, 28], "stem_width": 16,
                  "blocks": [[{"width": 32, "growth": 8}] * 2, [{"width": 32, "growth": 8}] * 2],
                  "transitions": [16]}
        model = build("densenet", config)
        model(torch.randn(8, 1, 28, 28)).shape   # (8, 10)
    """

    def __init__(
        self,
        *,
        input_shape: list[int],
        num_classes: int,
        stem_width: int,
        blocks: list[list[dict]],
        transitions: list[int],
    ):
        # input_shape: (channels, height, width).
        # stem_width: output channels of the 3×3 stem conv.
        # blocks: per dense block, one {"width", "growth"} dict per layer.
        # transitions: output width of the transition after each block but the last.
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.stem = conv(2, input_shape[0], stem_width, 3)
        features: list[nn.Module] = []
        in_width = stem_width
        for i, block in enumerate(blocks):
            layers = []
            for layer in block:
                layers.append(DenseLayer(in_width, layer["width"], layer["growth"]))
                in_width += layer["growth"]
            features.append(nn.Sequential(*layers))
            if i < len(transitions):
                features.append(Transition(in_width, transitions[i]))
                in_width = transitions[i]
        self.features = nn.Sequential(*features)
        self.norm = norm(2, in_width)
        self.pool = global_avg_pool(2)
        self.classifier = nn.Linear(in_width, num_classes)

    def forward(self, x):
        x = torch.relu(self.norm(self.features(self.stem(x))))
        return self.classifier(torch.flatten(self.pool(x), 1))

    def read_config(self) -> dict:
        blocks = [
            [
                {"width": layer.conv1.out_channels, "growth": layer.conv2.out_channels}
                for layer in part
            ]
            for part in self.features
            if not isinstance(part, Transition)
        ]
        transitions = [
            part.conv.out_channels for part in self.features if isinstance(part, Transition)
        ]
        return {
            "input_shape": [self.stem.in_channels, *self.input_shape[1:]],
            "num_classes": self.classifier.out_features,
            "stem_width": self.stem.out_channels,
            "blocks": blocks,
            "transitions": transitions,
        }


def default_blocks(growth: int = 12, layers: int = 4, count: int = 3) -> list[list[dict]]:
    """DenseNet-BC defaults: bottleneck 4 × growth."""
    return [[{"width": 4 * growth, "growth": growth} for _ in range(layers)] for _ in range(count)]


def complete(reader: ConfigReader) -> dict:
    stem_width = reader.integer("stem_width", 24)
    where = reader.where("blocks")
    blocks = []
    for b, raw_block in enumerate(as_list(reader.raw("blocks", default_blocks()), where)):
        block = []
        for i, raw in enumerate(as_list(raw_block, f"{where}[{b}]")):
            layer = as_record(raw, f"{where}[{b}][{i}]", LAYER_FIELDS)
            if set(layer) != set(LAYER_FIELDS):
                fail(f"{where}[{b}][{i}]", f"needs both {list(LAYER_FIELDS)}", layer)
            # 0: emptied by depth pruning; the layer's input reaches the output by concatenation
            block.append(
                {key: as_int(layer[key], f"{where}[{b}][{i}].{key}", low=0) for key in LAYER_FIELDS}
            )
        blocks.append(block)
    if min(reader.input_shape[1:]) >> (len(blocks) - 1) < 1:
        reader.fail("blocks", f"pool input {reader.input_shape} below 1 pixel", len(blocks))
    # Default transitions halve the width they receive (DenseNet-BC compression 0.5).
    default_transitions, width = [], stem_width
    for block in blocks[:-1]:
        width = max(1, (width + sum(layer["growth"] for layer in block)) // 2)
        default_transitions.append(width)
    transitions = reader.integers(
        "transitions", default_transitions, length=len(blocks) - 1, min_length=0
    )
    return {"stem_width": stem_width, "blocks": blocks, "transitions": transitions}


FAMILY = Family(
    id="densenet",
    module_class=DenseNet,
    keys=("stem_width", "blocks", "transitions"),
    spatial_dims=(2,),
    default_input_shape=(3, 32, 32),
    complete=complete,
    read=DenseNet.read_config,
)
