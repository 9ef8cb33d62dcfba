"""Classic channel-importance criteria behind one interface (see `registry.build_criterion`)."""

from metaprune.criteria.gradients import GradientStatistics, collect_gradient_statistics
from metaprune.criteria.registry import (
    CRITERIA,
    DATA_FREE_CRITERIA,
    Criterion,
    build_criterion,
)

__all__ = [
    "CRITERIA",
    "DATA_FREE_CRITERIA",
    "Criterion",
    "GradientStatistics",
    "build_criterion",
    "collect_gradient_statistics",
]
