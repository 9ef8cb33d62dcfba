"""Building blocks shared by the zoo families: dimension-generic conv/norm/pool, heads, sizes."""

from torch import nn

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
_AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d}
_GLOBAL_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}
_ACTIVATION = {"relu": nn.ReLU, "relu6": nn.ReLU6}


def conv(dims: int, in_channels: int, out_channels: int, kernel: int, **kwargs) -> nn.Module:
    """Conv1d/Conv2d with 'same'-style padding for odd kernels and no bias (a norm follows)."""
    kwargs.setdefault("padding", kernel // 2)
    kwargs.setdefault("bias", False)
    return _CONV[dims](in_channels, out_channels, kernel, **kwargs)


def norm(dims: int, channels: int) -> nn.Module:
    return _NORM[dims](channels)


def max_pool(dims: int, size: int) -> nn.Module:
    return _MAX_POOL[dims](size)


def avg_pool(dims: int, size: int) -> nn.Module:
    return _AVG_POOL[dims](size)


def global_avg_pool(dims: int) -> nn.Module:
    return _GLOBAL_POOL[dims](1)


def dims_of(layer: nn.Module) -> int:
    """1 for Conv1d/BatchNorm1d-like layers, 2 for their 2-D versions."""
    for table in (_CONV, _NORM):
        for dims, cls in table.items():
            if isinstance(layer, cls):
                return dims
    raise TypeError(f"{type(layer).__name__} is neither a 1-D nor a 2-D conv/norm layer")


class ConvNormAct(nn.Module):
    """conv → BatchNorm → activation (or none), the unit of every conv family."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        kernel: int = 3,
        *,
        stride: int = 1,
        groups: int = 1,
        activation: str | None = "relu",
    ):
        # dims: 1 for Conv1d/BatchNorm1d, 2 for Conv2d/BatchNorm2d.
        # kernel, stride, groups: of the convolution (padding keeps the size for odd kernels).
        # activation: "relu", "relu6" or None for a linear unit (MobileNetV2's projection).
        super().__init__()
        self.conv = conv(dims, in_channels, out_channels, kernel, stride=stride, groups=groups)
        self.bn = norm(dims, out_channels)
        self.act = _ACTIVATION[activation]() if activation else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels


def classifier(in_features: int, hidden: list[int], num_classes: int) -> nn.Sequential:
    """Linear → ReLU for each hidden width, then the output Linear."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def classifier_widths(head: nn.Sequential) -> tuple[list[int], int]:
    """(hidden widths, num_classes) of a head made by `classifier`."""
    linears = [layer for layer in head if isinstance(layer, nn.Linear)]
    return [layer.out_features for layer in linears[:-1]], linears[-1].out_features


def conv_size(size: int, kernel: int, stride: int = 1) -> int:
    """Output length of a conv with padding kernel // 2 along one dimension."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1
