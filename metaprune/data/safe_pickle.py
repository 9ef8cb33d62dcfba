"""A pickle reader that can rebuild numpy arrays, dicts, lists, bytes and str, and nothing else.

CIFAR-10's "python version" is a set of pickle files. A plain ``pickle.load`` runs whatever
callable the file names (``os.system`` included), so they are read with
:class:`RestrictedUnpickler`, whose ``find_class`` hands out only the few numpy functions that
rebuild an array; every other global is refused before it can be called.
"""

import codecs
import io
import pickle
from pathlib import Path

import numpy as np

from metaprune.data.errors import DatasetFormatError

# numpy moved its internals from numpy.core to numpy._core in 2.0; pickles written by either
# name the module they were written with, so both spellings map to the same function.
_NUMPY_CORE = getattr(np, "_core", None) or np.core
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_CORE.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_CORE.multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _NUMPY_CORE.numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _NUMPY_CORE.numeric._frombuffer,
    # Protocol-2 pickles written by Python 3 spell a bytes object as _codecs.encode(str, "latin1").
    ("_codecs", "encode"): codecs.encode,
}

# The largest CIFAR-10 batch is ~31 MB; anything far beyond is not a batch file.
MAX_PICKLE_BYTES = 256 * 2**20


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` allows only numpy array reconstruction.

    Example::

        with open("data_batch_1", "rb") as stream:
            batch = RestrictedUnpickler(stream, encoding="bytes").load()
    """

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DatasetFormatError(
                f"refusing to unpickle {module}.{name}: a dataset pickle may only hold numpy "
                "arrays, dicts, lists, numbers, bytes and str"
            ) from None


def load_restricted_pickle(path: str | Path):
    """Read one pickle file with :class:`RestrictedUnpickler` (Python-2 strings kept as bytes)."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise DatasetFormatError(f"{path.name}: {size:,} bytes is too large for a dataset pickle")
    payload = path.read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except DatasetFormatError as error:
        raise DatasetFormatError(f"{path.name}: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise DatasetFormatError(f"{path.name}: not a readable pickle: {error}") from error
