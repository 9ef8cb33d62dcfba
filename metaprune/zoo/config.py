"""Checking zoo configs: types, bounds and the size cap, with messages a client can act on.

A config arrives from a spec file a client uploaded, so every value is checked before anything is
allocated: integers are real integers (not bools, not floats), widths and depths are bounded, and
`ConfigReader` names the family and the key in every error.
"""

import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from torch import nn

from metaprune.errors import ModelFormatError

# Bounds that keep a hostile or mistyped spec from allocating gigabytes. Parameters, MACs and
# the largest activation are measured on a meta-device build and forward pass (nothing
# allocated) before the real build: few parameters can still mean a huge feature map.
MAX_PARAMS = 100_000_000
MAX_MACS = 20_000_000_000  # per sample; ResNet-50 at 224×224 needs 4.1 G
MAX_ACTIVATION = 1 << 24  # values in one layer's output for one sample (64 MiB of float32)
MAX_TOKENS = 4_096  # ViT sequence length (attention holds tokens² scores per head)
MAX_WIDTH = 65_536
MAX_LAYERS = 1_024
MAX_KERNEL = 63
MAX_INPUT_CHANNELS = 4_096
MAX_INPUT_SIZE = 65_536
MAX_INPUT_ELEMENTS = 1 << 24
MAX_CLASSES = 100_000

_short = reprlib.Repr()
_short.maxlist = _short.maxtuple = 8
_short.maxstring = 40


def fail(where: str, message: str, value: Any) -> NoReturn:
    """Raise the one error a bad config produces: where it is, what was expected, what came."""
    raise ModelFormatError(f"{where} {message}, got {_short.repr(value)}")


def as_int(value: Any, where: str, *, low: int = 1, high: int = MAX_WIDTH) -> int:
    """`value` as an int in [low, high]; bools and floats are refused (JSON 3.0 is not a width)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        fail(where, f"must be an integer in [{low}, {high}]", value)
    return value


def as_int_list(
    value: Any,
    where: str,
    *,
    low: int = 1,
    high: int = MAX_WIDTH,
    length: int | None = None,
    min_length: int = 1,
) -> list[int]:
    """`value` as a list of bounded ints, of exactly `length` entries when given."""
    items = as_list(value, where, length=length, min_length=min_length)
    return [as_int(item, f"{where}[{i}]", low=low, high=high) for i, item in enumerate(items)]


def as_list(value: Any, where: str, *, length: int | None = None, min_length: int = 1) -> list:
    """`value` as a list (a JSON array) with a bounded number of entries."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        fail(where, "must be a list", value)
    if length is not None and len(value) != length:
        fail(where, f"must have {length} entries", value)
    if not min_length <= len(value) <= MAX_LAYERS:
        fail(where, f"must have between {min_length} and {MAX_LAYERS} entries", value)
    return list(value)


def as_record(value: Any, where: str, fields: Sequence[str]) -> dict:
    """`value` as a dict (a JSON object) whose keys are among `fields`."""
    if not isinstance(value, Mapping):
        fail(where, f"must be an object with keys {list(fields)}", value)
    unknown = sorted(str(key) for key in value if key not in fields)
    if unknown:
        fail(where, f"has unknown keys {unknown}; known keys are {list(fields)}", dict(value))
    return dict(value)


class ConfigReader:
    """One family's config overrides, read key by key with a default, type and bounds.

    Example::

        reader = ConfigReader("cnn1d", {"widths": [8, 16]}, keys=("widths",))
        reader.integers("widths", default=[32, 64])   # -> [8, 16]
        reader.integers("widths", default=[32, 64], low=9)   # ModelFormatError: 8 < 9
    """

    def __init__(
        self,
        family: str,
        overrides: Mapping[str, Any],
        keys: Sequence[str],
        *,
        input_shape: list[int],
        num_classes: int,
    ):
        # family: the zoo family id, named in every message.
        # overrides: the keys the caller set; the rest take the family's defaults.
        # keys: every key the family knows (besides input_shape and num_classes).
        # input_shape, num_classes: already checked; families derive defaults from them.
        self.family = family
        self.values = dict(overrides)
        self.input_shape = input_shape
        self.num_classes = num_classes
        unknown = sorted(str(key) for key in self.values if key not in keys)
        if unknown:
            raise ModelFormatError(
                f"zoo family {family!r}: unknown config keys {unknown}; known keys are "
                f"{['input_shape', 'num_classes', *keys]}"
            )

    def where(self, key: str) -> str:
        return f"zoo family {self.family!r}: config key {key!r}"

    def fail(self, key: str, message: str, value: Any) -> NoReturn:
        fail(self.where(key), message, value)

    def raw(self, key: str, default: Any) -> Any:
        """The value as given, or `default`; the caller checks it."""
        return self.values.get(key, default)

    def integer(self, key: str, default: int, *, low: int = 1, high: int = MAX_WIDTH) -> int:
        return as_int(self.raw(key, default), self.where(key), low=low, high=high)

    def integers(self, key: str, default: list[int], **bounds) -> list[int]:
        return as_int_list(self.raw(key, default), self.where(key), **bounds)

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            self.fail(key, "must be true or false", value)
        return value

    def choice(self, key: str, default: str, options: Sequence[str]) -> str:
        value = self.raw(key, default)
        if value not in options:
            self.fail(key, f"must be one of {list(options)}", value)
        return value


def as_input_shape(value: Any, family: str, ndims: Sequence[int]) -> list[int]:
    """A per-sample, channel-first input shape with `len(shape) - 1` in `ndims` spatial dims."""
    where = f"zoo family {family!r}: input_shape"
    ranks = " or ".join(str(n + 1) for n in ndims)
    shape = as_list(value, where)
    if len(shape) - 1 not in ndims:
        fail(where, f"must have {ranks} entries (channels first, no batch dimension)", value)
    # A rank-1 shape is a feature vector (MLP input), not a channel count.
    channel_cap = MAX_INPUT_CHANNELS if len(shape) > 1 else MAX_INPUT_SIZE
    as_int(shape[0], f"{where}[0] (channels)", high=channel_cap)
    for i, size in enumerate(shape[1:], start=1):
        as_int(size, f"{where}[{i}]", high=MAX_INPUT_SIZE)
    elements = 1
    for size in shape:
        elements *= size
    if elements > MAX_INPUT_ELEMENTS:
        fail(where, f"must hold at most {MAX_INPUT_ELEMENTS} values per sample", value)
    return list(shape)


@dataclass(frozen=True)
class Family:
    """What the zoo knows about one family: how to complete, build and read back its configs."""

    # The family id, e.g. "resnet".
    id: str
    # The nn.Module class; its keyword arguments are exactly the config keys.
    module_class: type[nn.Module]
    # Config keys besides input_shape and num_classes, in the order defaults list them.
    keys: tuple[str, ...]
    # Accepted numbers of spatial dimensions of input_shape (1 for (C, L), 2 for (C, H, W)).
    spatial_dims: tuple[int, ...]
    # The input shape `build` assumes when a config gives none.
    default_input_shape: tuple[int, ...]
    # Fills defaults into the reader's overrides and checks every value; returns the other keys.
    complete: Callable[[ConfigReader], dict]
    # Reads the actual widths of a (possibly pruned) module back into a config.
    read: Callable[[nn.Module], dict]
