"""Where datasets are cached, and how a cache file is written without ever being half-written."""

import os
import tempfile
from pathlib import Path

import numpy as np

from metaprune.data.npz import Splits


def cache_dir() -> Path:
    """The cache root: ``$METAPRUNE_CACHE`` if set, else ``~/.cache/metaprune``.

    The variable is read on every call (not at import time), so tests and services can point
    it elsewhere after MetaPrune was imported.
    """
    configured = os.environ.get("METAPRUNE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "metaprune"


def dataset_cache_path(dataset_id: str) -> Path:
    """The ``.npz`` file a built-in dataset is cached in (it may not exist yet)."""
    return cache_dir() / "datasets" / f"{dataset_id}.npz"


def write_splits_atomically(splits: Splits, path: Path) -> Path:
    """Save ``splits`` as an uncompressed ``.npz`` at ``path`` and return ``path``.

    The file is written under a temporary name and renamed into place, so a reader running in
    parallel (several Ray workers building the same cache) sees either nothing or the whole file.
    Uncompressed because loading speed matters more than the few tens of MB saved.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".npz")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **splits._asdict())
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; a cache is meant to be readable
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
