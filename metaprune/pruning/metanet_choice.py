"""Which allocation `prune(method="metanet")` uses, chosen per model by a forward pass.

The sparsity head proposes a keep ratio per layer; how far to trust it differs by model. So
with data and a MACs or params target the metanet path builds a few candidate policies,

    keep = prior ** (1 - strength) * proposal ** strength

(``prior`` is the uniform keep ratio of the target, so strength 0 is uniform allocation; the
engine rescales each candidate to the exact target), where ``proposal`` is either the head's
answer (``head@s``) or the allocation MEASURED on the model being pruned (``measured@s``,
`metaprune.pruning.damage`: each group alone pruned by a few fractions, its loss increase read
on training batches, the MACs spent where they hurt least). It prunes the model with each,
drops any candidate that misses the target by more than the engine's 2 %, re-estimates
BatchNorm statistics on a few training batches and keeps the candidate with the lowest
cross-entropy on other training batches. Only forward passes: no optimiser step is taken, so
the fine-tune budget is unchanged. The test data is never read.

The measured candidates are not learned. Without a trained head (e.g. the benchmark's null
metanetwork) the same choice runs over the non-learned candidates alone, so a benchmark can
tell what the head adds to the measurement.

Example::

    candidates = candidates_for(epochs_after_prune=0, head=True)
    [c.name for c in candidates]   # ['uniform', 'head@0.5', 'head@1', 'measured@1', ...]
    index, note = choose_candidate(policies, counts_of=..., remove=..., meets_target=...,
                                   calibration=..., scoring=...)
    note["candidates"][index]["candidate"], note["chosen"]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from metaprune.errors import MetaPruneError
from metaprune.pruning.latency_choice import fixed_batches, loss_on


@dataclass(frozen=True)
class Candidate:
    """One candidate policy: a proposal blended with uniform allocation.

    Example::

        Candidate("head", 0.5).name      # 'head@0.5'
        Candidate("uniform", 0.0).name   # 'uniform'
    """

    source: str  # "uniform", "head" (the sparsity head) or "measured" (`damage_policy`)
    strength: float  # 0: uniform allocation, 1: the proposal as it is

    @property
    def name(self) -> str:
        return "uniform" if self.source == "uniform" else f"{self.source}@{self.strength:g}"


UNIFORM = Candidate("uniform", 0.0)
# The sets were chosen on the validation split (15 models, 2x/3x/4x, budgets 0/1/4,
# `benchmarks/metanet-notes.md`): with no fine-tuning the loss after recalibration ranks
# candidates well and every candidate helps somewhere; with fine-tuning to follow, the
# proposals followed all the way lost up to 25 (head) and 33 (measured) pts on some models,
# half way did not.
CANDIDATES = (UNIFORM, Candidate("head", 0.5), Candidate("head", 1.0),
              Candidate("measured", 1.0), Candidate("measured", 0.5))  # no fine-tuning follows
CANDIDATES_FINETUNED = (UNIFORM, Candidate("head", 0.5), Candidate("measured", 0.5))
CALIBRATION_BATCHES = 8  # training batches that re-estimate each candidate's BatchNorm
SCORE_BATCHES = 4  # other training batches each candidate's loss is read on
# names the choice in benchmark run logs: a change here makes new metanet runs
CHOICE_ID = (f"forward-loss-{CALIBRATION_BATCHES}+{SCORE_BATCHES}-target-checked:"
             + ",".join(c.name for c in CANDIDATES) + "|finetuned:"
             + ",".join(c.name for c in CANDIDATES_FINETUNED) + "|measured-damage/1")


def uniform_prior(speedup: float | None, params_ratio: float | None) -> float:
    """The keep ratio of every layer under uniform allocation, as a first guess: channels
    scale MACs and params of a layer with both its inputs and outputs, so ~ target^(1/2)."""
    return speedup ** -0.5 if speedup is not None else params_ratio ** 0.5


def candidates_for(epochs_after_prune: int, *, head: bool,
                   head_strengths: Sequence[float] | None = None) -> tuple[Candidate, ...]:
    """The candidates for a prune followed by `epochs_after_prune` epochs.

    Args:
        epochs_after_prune: fine-tune epochs that follow the prune.
        head: whether a trained sparsity head answered (False: the non-learned ones only).
        head_strengths: a metanetwork's own fixed strengths (e.g. one: no choice left);
            these replace every candidate.
    """
    if head_strengths:
        return tuple(Candidate("head", float(s)) if s else UNIFORM for s in head_strengths)
    chosen = CANDIDATES if epochs_after_prune == 0 else CANDIDATES_FINETUNED
    return tuple(c for c in chosen if head or c.source != "head")


def blended_policy(proposal: dict[str, float], prior: float, strength: float) -> dict[str, float]:
    """``prior ** (1 - strength) * proposal ** strength`` per module, at most 1."""
    return {name: min(1.0, prior ** (1.0 - strength) * ratio ** strength)
            for name, ratio in proposal.items()}


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


def choose_candidate(policies: Sequence[tuple[Candidate, dict[str, float]]], *,
                     counts_of: Callable[[dict[str, float]], list[int]],
                     remove: Callable[[list[int]], nn.Module],
                     meets_target: Callable[[nn.Module], bool],
                     calibration, scoring) -> tuple[int, dict]:
    """(index, note): the candidate whose pruned model has the lowest recalibrated loss.

    Args:
        policies: (candidate, module name -> keep ratio) pairs.
        counts_of: policy -> removal counts at the prune's target (raises a MetaPruneError
            when the policy cannot reach it).
        remove: counts -> a pruned copy of the (rewritten) dense model.
        meets_target: pruned model -> whether its real MACs/params are within the target's
            tolerance; a candidate that misses is dropped.
        calibration, scoring: training batches (`calibration_and_scoring`).

    A single candidate is returned without scoring. If every candidate is dropped the first
    one is returned and the engine reports (or corrects) its miss. The note lists every
    candidate with its loss (null when dropped) and why it was dropped.
    """
    if len(policies) == 1:
        candidate = policies[0][0]
        return 0, {"candidates": [_entry(candidate, None, None)], "chosen": 0,
                   "candidate": candidate.name, "scored_on": None}
    losses, dropped = [], []
    for _, policy in policies:
        try:
            pruned = remove(counts_of(policy))
        except MetaPruneError as error:
            losses.append(math.inf)
            dropped.append(f"cannot be pruned to the target: {str(error)[:120]}")
            continue
        if not meets_target(pruned):
            losses.append(math.inf)
            dropped.append("misses the target by more than 2 %")
            continue
        losses.append(recalibrated_loss(pruned, calibration, scoring))
        dropped.append(None)
    chosen = min(range(len(losses)), key=lambda i: (losses[i], i))
    note = {"candidates": [_entry(candidate, loss, why)
                           for (candidate, _), loss, why in zip(policies, losses, dropped)],
            "chosen": chosen, "candidate": policies[chosen][0].name,
            "scored_on": f"{len(calibration)} training batches re-estimate BatchNorm, "
                         f"{len(scoring)} others score; forward passes only, no optimiser "
                         "step (the fine-tune budget is unchanged), never the test data"}
    return chosen, note


def _entry(candidate: Candidate, loss: float | None, dropped: str | None) -> dict:
    return {"candidate": candidate.name, "source": candidate.source,
            "strength": candidate.strength,
            "loss": None if loss is None or math.isinf(loss) else round(loss, 5),
            "dropped": dropped}
