"""`mlp`: a multilayer perceptron on the flattened input, plain or with residual blocks."""

import math

import torch
from torch import nn

from metaprune.zoo.config import ConfigReader, Family
from metaprune.zoo.layers import classifier, classifier_widths


class ResidualLinearBlock(nn.Module):
    """relu(x + fc2(relu(fc1(x)))): `width` is the residual stream, `inner` is free to prune."""

    def __init__(self, width: int, inner: int):
        super().__init__()
        self.fc1 = nn.Linear(width, inner)
        self.fc2 = nn.Linear(inner, width)

    def forward(self, x):
        return torch.relu(x + self.fc2(torch.relu(self.fc1(x))))


class MLP(nn.Module):
    """Flatten → hidden Linear layers → Linear head.

    Build it through `metaprune.zoo.build("mlp", config)`, which checks the config.

    Example::

        model = build("mlp", {"input_shape": [1, 40], "hidden": [64, 32]})
        model(torch.randn(8, 1, 40)).shape   # (8, 10)
    """

    def __init__(
        self,
        *,
        input_shape: list[int],
        num_classes: int,
        hidden: list[int],
        residual: bool,
        width: int | None,
    ):
        # input_shape: per-sample shape; any rank, it is flattened.
        # hidden: plain: the width of each hidden layer; residual: each block's inner width.
        # residual: use residual blocks on a stream of `width` features.
        # width: the residual stream width (stem output, every block output); None when plain.
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.residual = residual
        in_features = math.prod(input_shape)
        self.flatten = nn.Flatten()
        if residual:
            self.stem = nn.Sequential(nn.Linear(in_features, width), nn.ReLU())
            self.body = nn.Sequential(*(ResidualLinearBlock(width, inner) for inner in hidden))
            self.head = nn.Linear(width, num_classes)
        else:
            # The plain MLP is the classifier stack itself; stem and body stay empty.
            self.stem = nn.Identity()
            self.body = nn.Identity()
            self.head = classifier(in_features, hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(self.stem(self.flatten(x))))

    def read_config(self) -> dict:
        config = {"input_shape": list(self.input_shape), "residual": self.residual}
        if self.residual:
            config["width"] = self.stem[0].out_features
            config["hidden"] = [block.fc1.out_features for block in self.body]
            config["num_classes"] = self.head.out_features
        else:
            config["width"] = None
            config["hidden"], config["num_classes"] = classifier_widths(self.head)
        return config


def complete(reader: ConfigReader) -> dict:
    residual = reader.flag("residual", False)
    if not residual:
        width = reader.raw("width", None)
        if width is not None:
            reader.fail("width", "is only used with residual: true; leave it null", width)
        hidden = reader.integers("hidden", [128, 64], min_length=0)
        return {"hidden": hidden, "residual": False, "width": None}
    width = reader.integer("width", 128)
    hidden = reader.integers("hidden", [2 * width, 2 * width], min_length=0)
    return {"hidden": hidden, "residual": True, "width": width}


FAMILY = Family(
    id="mlp",
    module_class=MLP,
    keys=("hidden", "residual", "width"),
    spatial_dims=(0, 1, 2),
    default_input_shape=(1, 40),
    complete=complete,
    read=MLP.read_config,
)
