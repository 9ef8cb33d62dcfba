"""MetaPrune: meta-learned structured pruning of neural networks.

The public names below are the ones DESIGN.md §5 fixes; they are imported lazily so that
`import metaprune` stays cheap (no torch-geometric or torch-pruning import until needed).

Example::

    import metaprune
    model, example_inputs = metaprune.load_model("model.pt2")
    result = metaprune.prune(model, example_inputs, method="l2", speedup=2.0)
    metaprune.save_model(result.model, example_inputs, "pruned.pt2")
"""

from importlib import import_module

from metaprune.errors import (
    DatasetUnavailableError,
    InvalidTargetError,
    MetaPruneError,
    MissingDataError,
    ModelFormatError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "load_model": "metaprune.formats",
    "save_model": "metaprune.formats",
    "to_graph": "metaprune.graph",
    "NetworkGraph": "metaprune.graph",
    "prune": "metaprune.pruning",
    "load_metanet": "metaprune.metanet",
    "PruneResult": "metaprune.pruning",
    "PruneRequest": "metaprune.vocabulary",
}

__all__ = [
    "DatasetUnavailableError",
    "InvalidTargetError",
    "MetaPruneError",
    "MissingDataError",
    "ModelFormatError",
    "UnsupportedModelError",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'metaprune' has no attribute {name!r}")
