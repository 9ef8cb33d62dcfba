"""The MetaPrune gRPC service (`metaprune serve`) and its Python client.

Installed as ``metaprune.serving``. The contract is ``proto/metaprune/v1/pruning.proto``; the
stubs ``pruning_pb2*.py`` are generated from it (``make proto``).

Example::

    from metaprune.serving import prune_remote
    report = prune_remote("127.0.0.1:50051", "model.pt2", "pruned.pt2",
                          options={"method": "l2", "speedup": 2.0})
"""

from importlib import import_module

_LAZY = {"PruningClient": "client", "RemoteError": "client", "prune_remote": "client",
         "PruningServer": "server", "ServerConfig": "server", "Limits": "limits"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"metaprune.serving.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'metaprune.serving' has no attribute {name!r}")
