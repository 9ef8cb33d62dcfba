"""Validation of `prune()`'s arguments, before any work, so bad input fails fast."""

from dataclasses import dataclass
from pathlib import Path

from metaprune.criteria import CRITERIA, DATA_FREE_CRITERIA
from metaprune.errors import InvalidTargetError, MetaPruneError
from metaprune.pruning.allocation import ALLOCATIONS, load_policy
from metaprune.pruning.metanet_bridge import require_data_for_metanet
from metaprune.pruning.targets import Target

METHODS = ("metanet", *CRITERIA)


@dataclass
class PruneOptions:
    """The resolved choices of one `prune()` call."""

    criterion: str
    allocation: str
    metanet: object
    policy: dict | None
    target: Target | None


def resolve_options(method, criterion, metanet, allocation, speedup, params_ratio, policy,
                    data, latency_speedup=None) -> PruneOptions:
    """Validates the arguments before any work (so bad input fails fast)."""
    if method not in METHODS:
        raise InvalidTargetError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if method == "metanet":
        metanet = "default" if metanet is None else metanet
        allocation = "metanet" if allocation == "global" else allocation
        criterion = criterion or "l2"
    criterion = criterion or method
    if criterion not in CRITERIA:
        raise InvalidTargetError(
            f"unknown criterion {criterion!r}; valid criteria: {', '.join(CRITERIA)}"
        )
    if isinstance(allocation, dict) or (isinstance(allocation, (str, Path))
                                        and str(allocation).endswith(".json")):
        if policy is not None:
            raise InvalidTargetError("give the policy either as allocation or as policy, not both")
        policy, allocation = allocation, "policy"
    elif allocation not in ALLOCATIONS:
        raise InvalidTargetError(
            f"unknown allocation {allocation!r}; use one of {', '.join(ALLOCATIONS)} "
            "or a policy (dict or JSON file)"
        )
    if policy is not None and allocation == "global":
        allocation = "policy"
    target = Target.from_arguments(speedup, params_ratio, latency_speedup)
    if allocation == "metanet" and metanet is None:
        metanet = "default"
    if metanet is not None:
        require_data_for_metanet(data)
    if criterion in ("taylor", "hessian") and data is None:
        raise MetaPruneError(
            f"criterion {criterion!r} needs data (it uses gradients of the loss); give a dataset "
            f"or use a data-free criterion: {', '.join(DATA_FREE_CRITERIA)}"
        )
    if target is None and policy is None and allocation != "metanet":
        raise InvalidTargetError(
            "nothing to prune to: give a speedup, a params_ratio or a policy"
        )
    return PruneOptions(criterion, allocation, metanet,
                        load_policy(policy) if policy is not None else None, target)
