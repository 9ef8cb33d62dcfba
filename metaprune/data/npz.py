"""Strict reading of a dataset ``.npz`` (the format of the service's ``UploadData``).

An ``.npz`` is a zip of ``.npy`` members. Before any array is read, every member's header is
inspected (name, dtype, shape), so a file that declares a 100 GB array or an object array is
refused without allocating it; arrays are then read with ``allow_pickle=False``.
"""

import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from metaprune.data.errors import DatasetFormatError

# Bounds that keep a hostile upload from exhausting memory: 2**28 elements is 1 GiB of float32
# per array; 10,000 classes is far beyond any classification set MetaPrune fine-tunes on.
MAX_ELEMENTS_PER_ARRAY = 2**28
MAX_CLASSES = 10_000

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
_INPUT_KINDS = "uif"  # unsigned, signed integer, floating point; no bool, complex, object
_LABEL_KINDS = "ui"


class Splits(NamedTuple):
    """Raw arrays of a dataset, as stored in an ``.npz`` (inputs not yet normalised)."""

    x_train: np.ndarray  # (N_train, *input_shape), numeric
    y_train: np.ndarray  # (N_train,), integer class indices
    x_test: np.ndarray  # (N_test, *input_shape), numeric
    y_test: np.ndarray  # (N_test,), integer class indices


def read_npz(path: str | Path) -> Splits:
    """Read and validate a dataset ``.npz`` with keys ``x_train, y_train, x_test, y_test``.

    Raises :class:`DatasetFormatError` naming the problem: not a zip, missing or extra keys,
    non-numeric or object dtypes, inconsistent shapes, too many elements, NaN/Inf inputs,
    non-integer or out-of-range labels.

    Example::

        np.savez("mine.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
        splits = read_npz("mine.npz")      # validated numpy arrays
    """
    path = Path(path)
    _check_headers(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            splits = Splits(*(archive[key] for key in REQUIRED_KEYS))
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise DatasetFormatError(f"{path.name}: cannot read arrays: {error}") from error
    validate_splits(splits, source=path.name)
    return splits


def _check_headers(path: Path) -> None:
    """Refuse wrong member names, dtypes and sizes from the headers alone, before reading data."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DatasetFormatError(f"{path.name}: not an .npz (zip) file: {error}") from error
    with archive:
        names = sorted(archive.namelist())
        expected = sorted(f"{key}.npy" for key in REQUIRED_KEYS)
        if names != expected:
            raise DatasetFormatError(
                f"{path.name}: an .npz dataset holds exactly the arrays "
                f"{', '.join(REQUIRED_KEYS)}; "
                f"found {', '.join(n.removesuffix('.npy') for n in names) or 'nothing'}"
            )
        for name in names:
            with archive.open(name) as member:
                shape, dtype = _read_npy_header(member, f"{path.name}:{name}")
            _check_array_meta(name.removesuffix(".npy"), shape, dtype, path.name)


def _read_npy_header(stream, where: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    except ValueError as error:
        raise DatasetFormatError(f"{where}: not a valid .npy member: {error}") from error
    return shape, dtype


def _check_array_meta(key: str, shape: tuple[int, ...], dtype: np.dtype, source: str) -> None:
    kinds = _LABEL_KINDS if key.startswith("y") else _INPUT_KINDS
    if dtype.hasobject or dtype.kind not in kinds:
        wanted = "integer" if key.startswith("y") else "numeric (integer or float)"
        raise DatasetFormatError(f"{source}: {key} has dtype {dtype}; it must be {wanted}")
    elements = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if elements > MAX_ELEMENTS_PER_ARRAY:
        raise DatasetFormatError(
            f"{source}: {key} has {elements:,} elements, above the limit of "
            f"{MAX_ELEMENTS_PER_ARRAY:,}"
        )


def validate_splits(splits: Splits, *, source: str) -> None:
    """Check dtypes, shapes, finiteness and label range of arrays already in memory."""
    for key, array in splits._asdict().items():
        if not isinstance(array, np.ndarray):
            raise DatasetFormatError(f"{source}: {key} is a {type(array).__name__}, not an array")
        _check_array_meta(key, array.shape, array.dtype, source)
    x_train, y_train, x_test, y_test = splits
    for x, y, part in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if x.ndim < 2:
            raise DatasetFormatError(
                f"{source}: x_{part} has shape {x.shape}; expected (samples, *input_shape)"
            )
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DatasetFormatError(
                f"{source}: y_{part} has shape {y.shape}; expected ({x.shape[0]},), one label per "
                f"sample of x_{part}"
            )
        if x.shape[0] == 0:
            raise DatasetFormatError(f"{source}: x_{part} holds no samples")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise DatasetFormatError(f"{source}: x_{part} contains NaN or infinite values")
        if y.min() < 0 or y.max() >= MAX_CLASSES:
            raise DatasetFormatError(
                f"{source}: y_{part} labels must lie in [0, {MAX_CLASSES}); "
                f"found [{y.min()}, {y.max()}]"
            )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetFormatError(
            f"{source}: x_train samples have shape {x_train.shape[1:]} but x_test samples "
            f"{x_test.shape[1:]}"
        )
    if int(max(y_train.max(), y_test.max())) < 1:
        raise DatasetFormatError(f"{source}: labels name a single class; a classifier needs two")
