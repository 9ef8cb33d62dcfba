"""The vocabulary of a pruning request: names, bounds, policies and recipes, checkpoints.

One torch-free package that the library, the CLI, the gRPC client and server and `metaprune
tune` all read, so a name, a bound or a file format is accepted the same way everywhere:

- `names`: method, criterion, allocation, dataset, format, optimiser and schedule ids;
- `bounds`: range checks (`speedup` > 1, `params_ratio` in (0, 1), keep ratios in (0, 1],
  `latency_batch`, `round_to`, `exclude`), each an `InvalidTargetError` naming the bound;
- `policy`: policies in every form (mapping, `tune` recipe, JSON text, JSON file) and `Recipe`;
- `checkpoints`: where metanetwork checkpoints are and their names;
- `request`: `PruneRequest`, every keyword of `metaprune.prune`, checked on construction.

Example::

    from metaprune.vocabulary import CRITERIA, PruneRequest, parse_policy
    PruneRequest(criterion="l1", params_ratio=0.5).target   # ('params_ratio', 0.5)
    parse_policy("tune-out/recipe.json")                     # {'features.0.unit.conv': 0.83}
"""

from metaprune.vocabulary.bounds import (
    MAX_LATENCY_BATCH,
    MAX_ROUND_TO,
    TOLERANCE,
    check_choice,
    check_keep_ratio,
    check_latency_batch,
    check_params_ratio,
    check_round_to,
    check_speedup,
)
from metaprune.vocabulary.checkpoints import (
    CHECKPOINT_DIR,
    available_metanetworks,
    default_checkpoint,
    resolve_checkpoint,
)
from metaprune.vocabulary.names import (
    ALLOCATIONS,
    CRITERIA,
    DATA_CRITERIA,
    DATA_FREE_CRITERIA,
    DATASETS,
    INPUT_FORMATS,
    METHODS,
    OPTIMIZERS,
    OUTPUT_FORMATS,
    ROUND_TO_AUTO,
    SCHEDULES,
    TEXT_DATASETS,
)
from metaprune.vocabulary.policy import (
    MAX_POLICY_BYTES,
    RECIPE_FORMAT,
    Recipe,
    check_policy,
    parse_policy,
    policy_from_json,
)
from metaprune.vocabulary.request import TARGETS, PruneRequest

__all__ = [
    "ALLOCATIONS", "CHECKPOINT_DIR", "CRITERIA", "DATASETS", "DATA_CRITERIA",
    "DATA_FREE_CRITERIA", "INPUT_FORMATS", "MAX_LATENCY_BATCH", "MAX_POLICY_BYTES",
    "MAX_ROUND_TO", "METHODS", "OPTIMIZERS", "OUTPUT_FORMATS", "PruneRequest", "RECIPE_FORMAT",
    "ROUND_TO_AUTO", "Recipe", "SCHEDULES", "TARGETS", "TEXT_DATASETS", "TOLERANCE",
    "available_metanetworks", "check_choice", "check_keep_ratio", "check_latency_batch", "check_params_ratio",
    "check_policy", "check_round_to", "check_speedup", "default_checkpoint",
    "parse_policy", "policy_from_json", "resolve_checkpoint",
]
