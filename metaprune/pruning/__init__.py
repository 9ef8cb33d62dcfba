"""Structured pruning: dependency groups, allocation, exact MACs/params targets, removal.

Example::

    from metaprune.pruning import prune
    result = prune(model, (torch.randn(1, 3, 32, 32),), method="l2", speedup=2.0)
    pruned, report = result.model, result.report
"""

from metaprune.pruning.allocation import MIN_KEEP_FRACTION, load_policy
from metaprune.vocabulary import ALLOCATIONS, METHODS
from metaprune.pruning.engine import PruneResult, prune, prune_request
from metaprune.pruning.unstructured import mask_density, prune_unstructured

__all__ = [
    "ALLOCATIONS",
    "METHODS",
    "MIN_KEEP_FRACTION",
    "PruneResult",
    "load_policy",
    "prune",
    "prune_request",
    "mask_density",
    "prune_unstructured",
]
