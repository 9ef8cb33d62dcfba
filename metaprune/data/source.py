"""What MetaPrune knows about each built-in dataset: its shape and how to obtain it."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from metaprune.data.npz import Splits


@dataclass(frozen=True)
class DatasetSource:
    """A built-in dataset id and the recipe that produces its raw arrays."""

    id: str  # the name users type: `metaprune data fetch ID`, `--dataset ID`
    input_shape: tuple[int, ...]  # per sample, channel first
    num_classes: int
    scale: float  # raw values are divided by this before standardisation (255 for 8-bit pixels)
    # Builds the raw arrays; `source` is the user's `--from` argument (a folder or file) or None.
    build: Callable[[Path | None], Splits]
    # True when `build` is offline and cheap, so loading may build the cache implicitly.
    # False when it reaches the network or needs user files: only `metaprune data fetch` builds it.
    automatic: bool
    # What `--from` names for this dataset (e.g. "a folder of CIFAR-10 python batches"), or None
    # when the dataset takes no source.
    source_hint: str | None
    how: str  # one line for `metaprune data list`: the command or step that provides it
    # Added to the "not in the cache" error: what the step does, and any alternative.
    details: str = ""
