"""The metanetwork checkpoints a server offers, described without importing torch.

`GetServerInfo` shows each checkpoint's scope and hash. The library's own reader,
`metaprune.metanet.scope.discover_checkpoints`, is plain Python (json, hashlib), but it lives in
the `metaprune.metanet` package, whose ``__init__`` imports torch, which the server process never
does. So that one module is loaded here from its file, on its own, without its package: the
same code reads the scopes in the server and in the library.

Example::

    describe_checkpoints(Path("metanets"))
    # [{"name": "metanet-cnn1d", "sha256": "…", "families": ["cnn1d"], "datasets": [...],
    #   "universal": False}]
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import metaprune
from metaprune.errors import MetaPruneError

_SCOPE_FILE = Path(metaprune.__file__).parent / "metanet" / "scope.py"
_MODULE_NAME = "metaprune.serving._metanet_scope"


def _scope_module():
    if _MODULE_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(_MODULE_NAME, _SCOPE_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_MODULE_NAME] = module  # dataclasses look their module up while building
        spec.loader.exec_module(module)
    return sys.modules[_MODULE_NAME]


def describe_checkpoints(folder: Path) -> list[dict]:
    """Name, sha256 and scope of every checkpoint in `folder` ([] when there is no folder).

    Raises MetaPruneError when a checkpoint's JSON document is missing or malformed, so a
    served folder fails at start-up, not when a job asks for it.
    """
    if not Path(folder).is_dir():
        return []
    try:
        return [checkpoint.describe() for checkpoint in _scope_module().discover_checkpoints(folder)]
    except MetaPruneError as error:
        raise MetaPruneError(f"--metanet-dir {folder}: {error}") from None
