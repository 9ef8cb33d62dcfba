"""How strongly to follow the metanetwork's sparsity head, chosen per model by a forward pass.

The head proposes a keep ratio per layer. How far to trust it differs by model: on the issue-12
validation split (`benchmarks/metanet-notes.md`) the head helped DenseNets and MobileNetV2s
and hurt ResNets. So `prune(method="metanet")` builds a few candidate policies between the head
and uniform allocation,

    keep = prior ** (1 - strength) * head ** strength   (strength in `strengths_for(epochs)`)

(``prior`` is the uniform keep ratio of the target; strength 0 is uniform allocation, 1 the
head as it is; the engine rescales each to the exact target), prunes the model with each,
re-estimates BatchNorm statistics on a few training batches and keeps the candidate with the
lowest cross-entropy on other training batches. Only forward passes: no optimiser step is
taken, so the fine-tune budget is unchanged. The test data is never read.

Example::

    policy, note = choose_head_strength(head, prior=2.0 ** -0.5, counts_of=..., remove=...,
                                        loader=train_loader)
    note["chosen"], note["candidates"]   # which strength, and every candidate's loss
"""

import math
from collections.abc import Callable

from torch import nn

from metaprune.errors import InvalidTargetError, UnsupportedModelError
from metaprune.pruning.latency_choice import choose_by_loss, fixed_batches, loss_on

# 0: uniform allocation, 1: the head as it is, 0.5: half way (in log keep ratio). The sets were
# chosen on the validation split (15 models, 2x/3x/4x, `benchmarks/metanet-notes.md`) for the
# shipped head (trained on measured per-group damage): with no fine-tuning the loss after
# recalibration ranks candidates well and all three help; with fine-tuning the head followed
# all the way lost up to 25 pts on some models (4x, 4 epochs), half way did not, and
# {0, 0.5} beat {0, 1} in every speed-up x budget cell.
STRENGTHS = (0.0, 0.5, 1.0)  # candidates when no fine-tuning follows the prune
STRENGTHS_FINETUNED = (0.0, 0.5)  # candidates when some does
# names the choice in benchmark run logs: a change here makes new metanet runs
CHOICE_ID = "forward-loss-8+4:" + ",".join(f"{s:g}" for s in STRENGTHS) + "|finetuned:" + \
    ",".join(f"{s:g}" for s in STRENGTHS_FINETUNED)
CALIBRATION_BATCHES = 8  # training batches that re-estimate each candidate's BatchNorm
SCORE_BATCHES = 4  # other training batches each candidate's loss is read on


def uniform_prior(speedup: float | None, params_ratio: float | None) -> float:
    """The keep ratio of every layer under uniform allocation, as a first guess: channels
    scale MACs and params of a layer with both its inputs and outputs, so ~ target^(1/2)."""
    return speedup ** -0.5 if speedup is not None else params_ratio ** 0.5


def strengths_for(epochs_after_prune: int) -> tuple[float, ...]:
    """The candidate head strengths for a prune followed by `epochs_after_prune` epochs."""
    return STRENGTHS if epochs_after_prune == 0 else STRENGTHS_FINETUNED


def blended_policy(head: dict[str, float], prior: float, strength: float) -> dict[str, float]:
    """``prior ** (1 - strength) * head ** strength`` per module, at most 1."""
    return {name: min(1.0, prior ** (1.0 - strength) * ratio ** strength)
            for name, ratio in head.items()}


def calibration_and_scoring(loader) -> tuple[list, list]:
    """The fixed training batches that re-estimate BatchNorm, and the others that score."""
    batches = fixed_batches(loader, CALIBRATION_BATCHES + SCORE_BATCHES)
    split = max(1, len(batches) - SCORE_BATCHES)
    return batches[:split], batches[split:] or batches


def recalibrated_loss(model: nn.Module, calibration, scoring) -> float:
    """Loss on `scoring` after BatchNorm statistics are re-estimated on `calibration` (as the
    engine's budget-0 fine-tune does, on fewer batches). Changes `model`'s BatchNorm only."""
    from metaprune.finetune.batchnorm import recalibrate_batchnorm  # data path only

    recalibrate_batchnorm(model, calibration, batches=len(calibration))
    return loss_on(model, scoring)


def choose_head_strength(head: dict[str, float], *, prior: float,
                         counts_of: Callable[[dict[str, float]], list[int]],
                         remove: Callable[[list[int]], nn.Module], loader,
                         strengths=STRENGTHS) -> tuple[dict[str, float], dict]:
    """(policy, note): the blend of `head` whose pruned model has the lowest recalibrated loss.

    Args:
        head: module name -> the sparsity head's keep ratio.
        prior: the uniform keep ratio (`uniform_prior`).
        counts_of: policy -> removal counts at the prune's target (raises InvalidTargetError
            when a policy cannot reach it).
        remove: counts -> a pruned copy of the (rewritten) dense model.
        loader: training batches ``(inputs, labels)``; its shuffling is left where it was.
        strengths: the candidate strengths (`STRENGTHS`).

    A candidate that cannot be pruned to the target scores an infinite loss; if none can, the
    head as it is (strength 1) is returned and the engine reports the error. A single
    candidate is returned without scoring.
    """
    policies = [blended_policy(head, prior, strength) for strength in strengths]
    if len(policies) == 1:
        return policies[0], {"candidates": [{"head_strength": strengths[0], "loss": None}],
                             "chosen": 0, "head_strength": strengths[0], "scored_on": None}
    calibration, scoring = calibration_and_scoring(loader)

    def loss_of(policy) -> float:
        try:
            return recalibrated_loss(remove(counts_of(policy)), calibration, scoring)
        except (InvalidTargetError, UnsupportedModelError):
            return math.inf

    chosen, losses = choose_by_loss(policies, lambda policy: policy, loss_of)
    if math.isinf(losses[chosen]):
        chosen = list(strengths).index(1.0) if 1.0 in strengths else len(strengths) - 1
    note = {"candidates": [{"head_strength": strength,
                            "loss": None if math.isinf(loss) else round(loss, 5)}
                           for strength, loss in zip(strengths, losses)],
            "chosen": chosen, "head_strength": strengths[chosen],
            "scored_on": f"{len(calibration)} training batches re-estimate BatchNorm, "
                         f"{len(scoring)} others score; forward passes only, no optimiser "
                         "step (the fine-tune budget is unchanged), never the test data"}
    return policies[chosen], note
