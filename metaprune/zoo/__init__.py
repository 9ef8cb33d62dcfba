"""Parametric model families: the corpus, the tests and the safetensors + spec format use them.

A family id and a JSON config describe a model completely. Configs list every per-layer width
(not a width multiplier), so a structurally pruned model is again a config of its family:
`config_of` reads the actual widths back, and `build` makes a module whose state dict the pruned
one loads into exactly. Every value is checked, and the parameter count is capped (measured on
a meta-device build, before anything is allocated), because configs come from clients' files.

Example::

    import torch
    from metaprune import zoo

    config = zoo.default_config("resnet", input_shape=(1, 28, 28), num_classes=10, depth=32)
    model = zoo.build("resnet", config)             # ResNet-32 for Fashion-MNIST
    # ... prune model structurally (e.g. torch-pruning), then:
    spec = {"family": "resnet", "config": zoo.config_of("resnet", model)}
    again = zoo.build(spec["family"], spec["config"])
    again.load_state_dict(model.state_dict())      # same widths, same outputs

Families: `mlp`, `cnn1d`, `vgg`, `resnet` (`dims` 1 or 2), `mobilenetv2`, `densenet`, `vit`.
"""

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from metaprune.errors import ModelFormatError
from metaprune.zoo import cnn1d, densenet, mlp, mobilenetv2, resnet, vgg, vit
from metaprune.zoo.config import (
    MAX_ACTIVATION,
    MAX_CLASSES,
    MAX_MACS,
    MAX_PARAMS,
    ConfigReader,
    Family,
    as_input_shape,
    as_int,
)

_FAMILIES: dict[str, Family] = {
    family.id: family
    for family in (
        mlp.FAMILY,
        cnn1d.FAMILY,
        vgg.FAMILY,
        resnet.FAMILY,
        mobilenetv2.FAMILY,
        densenet.FAMILY,
        vit.FAMILY,
    )
}
FAMILIES: tuple[str, ...] = tuple(_FAMILIES)

# A config is a small JSON document; this bounds the work of checking one from a client.
MAX_CONFIG_VALUES = 20_000

__all__ = [
    "FAMILIES",
    "MAX_PARAMS",
    "build",
    "config_of",
    "default_config",
    "example_inputs",
    "families_keys",
    "family_of",
]


def _family(family: Any) -> Family:
    if not isinstance(family, str) or family not in _FAMILIES:
        raise ModelFormatError(
            f"unknown zoo family {family!r}; known families are {list(FAMILIES)}"
        )
    return _FAMILIES[family]


def _count_values(value: Any, budget: int) -> int:
    """Number of scalars in a JSON-like value; counting stops once past `budget`."""
    total, pending = 0, [value]  # a stack, not recursion: a client controls the nesting
    while pending and total <= budget:
        item = pending.pop()
        if isinstance(item, Mapping):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        else:
            total += 1
    return total


def _check_cost(family: Family, config: dict) -> None:
    """Refuse configs over the size caps, measured on the meta device (nothing allocated)."""
    largest = 0

    def track(module, inputs, output):
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel())

    with torch.device("meta"):
        model = _construct(family, config).eval()
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_PARAMS:
        raise ModelFormatError(
            f"zoo family {family.id!r}: config describes {params:,} parameters, more than "
            f"the limit of {MAX_PARAMS:,}"
        )
    for module in model.modules():
        module.register_forward_hook(track)
    counter = FlopCounterMode(display=False)
    # Run outside the device context (the input is already on meta): its per-op hook would
    # make the pass several times slower.
    with counter, torch.no_grad():
        model(torch.empty(1, *config["input_shape"], device="meta"))
    macs = counter.get_total_flops() // 2
    if macs > MAX_MACS or largest > MAX_ACTIVATION:
        raise ModelFormatError(
            f"zoo family {family.id!r}: config needs {macs:,} MACs and a {largest:,}-value "
            f"feature map per sample; the limits are {MAX_MACS:,} and {MAX_ACTIVATION:,}"
        )


def default_config(
    family: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    **overrides: Any,
) -> dict:
    """The full config of `family` for inputs of `input_shape`, with `overrides` applied.

    Defaults that depend on other keys follow them: `depth=32` for a ResNet gives five blocks per
    stage, new `stage_widths` give blocks of those widths. Every value is checked.

    Args:
        family: a zoo family id (see `FAMILIES`).
        input_shape: per-sample, channel-first shape: (1, 40) for MNIST-1D, (1, 28, 28) for
            Fashion-MNIST, (3, 32, 32) for CIFAR.
        num_classes: outputs of the classifier.
        **overrides: config keys of the family to set instead of their defaults.

    Returns:
        A JSON-serialisable dict holding every key of the family.

    Raises:
        ModelFormatError: unknown family or key, or a value of the wrong type or out of bounds.

    Example::

        default_config("cnn1d", input_shape=(1, 40), num_classes=10, widths=[16, 32])
        # {'input_shape': [1, 40], 'num_classes': 10, 'widths': [16, 32],
        #  'kernel_sizes': [5, 5], 'pools': [2, 2], 'head': 'gap', 'hidden': []}
    """
    spec = _family(family)
    if _count_values(overrides, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
        raise ModelFormatError(
            f"zoo family {family!r}: config holds more than {MAX_CONFIG_VALUES} values"
        )
    shape = as_input_shape(input_shape, family, spec.spatial_dims)
    classes = as_int(num_classes, f"zoo family {family!r}: num_classes", high=MAX_CLASSES)
    reader = ConfigReader(family, overrides, spec.keys, input_shape=shape, num_classes=classes)
    return {"input_shape": shape, "num_classes": classes, **spec.complete(reader)}


def build(family: str, config: Mapping[str, Any]) -> nn.Module:
    """A freshly initialised module of `family` described by `config`.

    Args:
        family: a zoo family id (see `FAMILIES`).
        config: a dict such as `default_config` or `config_of` return (e.g. read from a spec
            file); missing keys take their defaults, `input_shape` defaults to the family's
            canonical input and `num_classes` to 10.

    Raises:
        ModelFormatError: unknown family or key, a bad value, or a model over the size caps
            (`MAX_PARAMS` parameters, `MAX_MACS` MACs or `MAX_ACTIVATION` values in one feature
            map per sample), checked on the meta device before anything is allocated.

    Example::

        model = build("vgg", {"input_shape": [1, 28, 28], "stages": [[16], [32]], "hidden": []})
    """
    spec = _family(family)
    if not isinstance(config, Mapping):
        raise ModelFormatError(
            f"zoo family {family!r}: config must be an object, got {type(config).__name__}"
        )
    overrides = dict(config)
    full = default_config(
        family,
        input_shape=overrides.pop("input_shape", list(spec.default_input_shape)),
        num_classes=overrides.pop("num_classes", 10),
        **overrides,
    )
    _check_cost(spec, full)
    return _construct(spec, full)


def _construct(family: Family, config: dict) -> nn.Module:
    """The family's module; layers a zero width leaves without channels (a residual branch
    emptied by depth pruning) become what they compute, as the pruning engine leaves them."""
    from metaprune.pruning.empty_layers import collapse_empty_layers  # imports no zoo

    with warnings.catch_warnings():  # a zero width's weight is empty: nothing to initialise
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return collapse_empty_layers(family.module_class(**config))


def config_of(family: str, module: nn.Module) -> dict:
    """The config that rebuilds `module`'s architecture, read from its actual layer widths.

    Works on structurally pruned modules: `build(family, config_of(family, pruned))` loads
    `pruned.state_dict()` exactly.

    Raises:
        ModelFormatError: `module` was not built by `family`, or its widths are not a valid config
            (e.g. a plain chain's layer pruned to zero channels; an emptied residual or
            dense branch is a width of 0 in resnet, mobilenetv2, densenet and vit).
    """
    spec = _family(family)
    if not isinstance(module, spec.module_class):
        raise ModelFormatError(
            f"zoo family {family!r}: expected a {spec.module_class.__name__}, "
            f"got {type(module).__name__}"
        )
    read = spec.read(module)
    return default_config(family, **read)


def family_of(module: nn.Module) -> str | None:
    """The id of the zoo family `module` belongs to, or None for any other module."""
    for family in _FAMILIES.values():
        if isinstance(module, family.module_class):
            return family.id
    return None


def example_inputs(config: Mapping[str, Any], *, batch: int = 2) -> tuple[torch.Tensor]:
    """Random inputs of `batch` samples shaped like `config["input_shape"]` (a 1-tuple)."""
    return (torch.randn(batch, *config["input_shape"]),)


def families_keys() -> dict[str, tuple[str, ...]]:
    """Each family id with its config keys, for listings."""
    return {
        family.id: ("input_shape", "num_classes", *family.keys) for family in _FAMILIES.values()
    }
