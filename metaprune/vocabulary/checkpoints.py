"""Where metanetwork checkpoints are found and what they are called.

Torch-free, so the gRPC server (which never imports torch) names the same checkpoints the
library loads. A checkpoint is ``NAME.safetensors`` with ``NAME.json`` beside it; the
committed ones live in the package's ``checkpoints/`` folder, and ``"default"`` is the first
``metanet*.safetensors`` there (`metaprune.metanet.scope.select_metanet` then picks, for a
model, a per-family checkpoint whose scope fits it or else this one, and its hash for the
report; other universal checkpoints, e.g. ``fast``, are used only when named).

Example::

    available_metanetworks()        # {'default': PosixPath('.../metanet.safetensors'),
                                    #  'fast': PosixPath('.../fast.safetensors'),
                                    #  'metanet': PosixPath('.../metanet.safetensors')}
    resolve_checkpoint("default")   # PosixPath('.../checkpoints/metanet.safetensors')
"""

from os import PathLike
from pathlib import Path

from metaprune.errors import MetaPruneError
from metaprune.vocabulary.names import DATA_FREE_CRITERIA

# The package's own checkpoints (metaprune/checkpoints/), shipped as package data.
CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
DEFAULT_NAME = "default"


def fallback_hint() -> str:
    """What to do without a metanetwork: the classic criteria."""
    return (f"prune with a classic criterion instead (method= one of "
            f"{', '.join(DATA_FREE_CRITERIA)}, or taylor/hessian with data)")


def default_checkpoint(folder: str | PathLike | None = None) -> Path | None:
    """The default checkpoint of `folder` (the package's own when None), if any."""
    folder = Path(folder) if folder is not None else CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = sorted(folder.glob("metanet*.safetensors"))
    return found[0] if found else None


def available_metanetworks(folder: str | PathLike | None = None) -> dict[str, Path]:
    """Name -> checkpoint path of every checkpoint in `folder`, plus "default" when any exists.

    The server offers these names, so a client never sends a path.
    """
    folder = Path(folder) if folder is not None else CHECKPOINT_DIR
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    default = default_checkpoint(folder)
    names = {DEFAULT_NAME: default} if default is not None else {}
    names.update({path.stem: path for path in files})
    return names


def resolve_checkpoint(name_or_path: str | PathLike, folder: str | PathLike | None = None) -> Path:
    """The checkpoint file of "default", a name from `available_metanetworks`, or a path."""
    known = available_metanetworks(folder)
    if isinstance(name_or_path, str) and name_or_path in known:
        return known[name_or_path]
    if name_or_path == DEFAULT_NAME:
        where = Path(folder) if folder is not None else CHECKPOINT_DIR
        raise MetaPruneError(f"no metanetwork checkpoint is available (none under {where}); "
                             + fallback_hint())
    path = Path(name_or_path)
    if not path.is_file():
        raise MetaPruneError(f"metanetwork checkpoint {str(path)!r} does not exist; "
                             + fallback_hint())
    return path
