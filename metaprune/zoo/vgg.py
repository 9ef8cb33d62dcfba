"""`vgg`: Conv2d stages with per-layer widths and max-pooling, then flatten → Linear layers."""

import torch
from torch import nn

from metaprune.zoo.config import ConfigReader, Family, as_int_list, as_list
from metaprune.zoo.layers import ConvNormAct, classifier, classifier_widths, max_pool


class VGG(nn.Module):
    """VGG-style network: each stage is 3×3 ConvNormAct layers followed by a 2×2 max-pool.

    The classifier reads the flattened feature map (channels × height × width), so pruning a
    channel of the last conv removes a block of height × width input columns of the first Linear.

    Example::

        model = build("vgg", {"input_shape": [1, 28, 28], "stages": [[16], [32, 32]]})
        model(torch.randn(8, 1, 28, 28)).shape   # (8, 10)
    """

    def __init__(
        self,
        *,
        input_shape: list[int],
        num_classes: int,
        stages: list[list[int]],
        hidden: list[int],
    ):
        # input_shape: (channels, height, width).
        # stages: the conv widths of each stage; every stage ends with a 2×2 max-pool.
        # hidden: widths of the hidden Linear layers after the flatten (may be empty).
        super().__init__()
        self.input_shape = tuple(input_shape)
        channels, height, width = input_shape
        blocks = []
        for stage in stages:
            layers = []
            for out_channels in stage:
                layers.append(ConvNormAct(2, channels, out_channels))
                channels = out_channels
            layers.append(max_pool(2, 2))
            blocks.append(nn.Sequential(*layers))
            height, width = height // 2, width // 2
        self.features = nn.Sequential(*blocks)
        self.classifier = classifier(channels * height * width, hidden, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))

    def read_config(self) -> dict:
        hidden, num_classes = classifier_widths(self.classifier)
        stages = [
            [layer.out_channels for layer in stage if isinstance(layer, ConvNormAct)]
            for stage in self.features
        ]
        first_conv = self.features[0][0].conv
        return {
            "input_shape": [first_conv.in_channels, *self.input_shape[1:]],
            "num_classes": num_classes,
            "stages": stages,
            "hidden": hidden,
        }


DEFAULT_STAGES = ([32, 32], [64, 64], [128, 128])


def complete(reader: ConfigReader) -> dict:
    smallest = min(reader.input_shape[1:])
    # As many default stages as keep at least a 2×2 map after pooling (one for tiny inputs).
    fitting = max(1, min(len(DEFAULT_STAGES), (smallest // 2).bit_length() - 1))
    stages = as_list(reader.raw("stages", list(DEFAULT_STAGES[:fitting])), reader.where("stages"))
    stages = [
        as_int_list(stage, f"{reader.where('stages')}[{i}]") for i, stage in enumerate(stages)
    ]
    if smallest >> len(stages) < 1:
        reader.fail("stages", f"pool a {smallest}-pixel input side below 1 pixel", stages)
    hidden = reader.integers("hidden", [128], min_length=0)
    return {"stages": stages, "hidden": hidden}


FAMILY = Family(
    id="vgg",
    module_class=VGG,
    keys=("stages", "hidden"),
    spatial_dims=(2,),
    default_input_shape=(3, 32, 32),
    complete=complete,
    read=VGG.read_config,
)
