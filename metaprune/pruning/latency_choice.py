"""Which latency allocation to use, chosen by a short fine-tune of each candidate.

The latency allocation reorders the global importance ranking by measured time per MAC
(`latency_cost.latency_allocation`). How far time may reorder it is a trade: a layer that is
slow for its MACs is cheap to cut for latency, but the criterion's scores are normalised per
layer, so nothing says whether that layer's channels matter more than the rest (issue 13's
first bench: stripping the full-resolution stage cost 3.3 points at equal latency). With data
the question is answered by measurement, as NetAdapt does: each candidate (the global
ranking's order, half and full time weighting) is pruned to the same predicted latency,
fine-tuned for a few steps on training batches, and the one with the lowest loss on other
training batches is used (pruned again from the dense model, with the full fine-tune budget).

Tried first, and worse on the development models: per-layer loss curves or OBD estimates spent
by a HALP-style knapsack (loss per millisecond saved) concentrate the damage in few layers (a
ResNet's last stage went to its floor: −10 to −23 points after fine-tuning); the loss right
after pruning, without the short fine-tune, picked the most time-driven candidate and lost
1–3 points.

Example::

    allocation, note = choose_latency_allocation(groups, keys, latency, cost, target,
                                                 remove, train_loader)
    note["chosen"], note["candidates"]   # which one, and every candidate's loss
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metaprune.errors import InvalidTargetError
from metaprune.pruning.latency_cost import LatencyModel, latency_allocation
from metaprune.pruning.latency_target import AIM
from metaprune.pruning.targets import Target, solve_counts

# (time_weight, thinning) of `latency_allocation`: the global ranking's order, then more time
CANDIDATES = ((0.0, False), (0.5, True), (1.0, True))
STEPS = 24  # short fine-tune steps per candidate (the same batches for all)
EVAL_BATCHES = 4  # training batches, apart from those, each candidate's loss is read on


def _generators(loader) -> list[torch.Generator]:
    """The random generators a loader's shuffling draws from (wrappers and samplers walked)."""
    found, stack, seen = [], [loader], set()
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Generator):
            found.append(item)
            continue
        attributes = getattr(item, "__dict__", {})
        stack.extend(attributes.get(name) for name in ("loader", "sampler", "batch_sampler",
                                                        "generator"))
    return found


def fixed_batches(loader, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `count` batches of a loader, leaving its shuffling where it was (so the
    fine-tuning that follows sees the same data order as with any other allocation)."""
    generators = _generators(loader)
    states = [generator.get_state() for generator in generators]
    batches = []
    for inputs, labels in loader:
        batches.append((inputs, labels))
        if len(batches) >= count:
            break
    for generator, state in zip(generators, states):
        generator.set_state(state)
    return batches


def _loss(model: nn.Module, inputs, labels, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of one batch, scored as fine-tuning scores it (`scored_rows`: logits or a
    transformers output, one row per token for a language model, unlabelled tokens skipped)."""
    from metaprune.finetune.loop import scored_rows  # the fine-tuning's own scoring

    logits, rows = scored_rows(model(inputs), labels)
    return F.cross_entropy(logits, rows, reduction=reduction)


@torch.no_grad()
def loss_on(model: nn.Module, batches) -> float:
    """Mean cross-entropy of `model` (in eval mode) over the labelled rows of `batches`."""
    from metaprune.data.text_corpus import IGNORED

    model.eval()
    total, samples = 0.0, 0
    for inputs, labels in batches:
        total += float(_loss(model, inputs, labels, reduction="sum"))
        samples += int((labels != IGNORED).sum())
    return total / max(samples, 1)


def short_finetuned_loss(model: nn.Module, batches, lr: float = 1e-3) -> float:
    """Loss of `model` on the last `EVAL_BATCHES` of `batches` after AdamW steps on the rest
    (on all of them when there are too few to split). Trains `model` in place."""
    held = batches[-EVAL_BATCHES:] if len(batches) > EVAL_BATCHES else batches
    steps = batches[:-EVAL_BATCHES] if len(batches) > EVAL_BATCHES else batches
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for inputs, labels in steps:
        optimizer.zero_grad(set_to_none=True)
        _loss(model, inputs, labels).backward()
        optimizer.step()
    return loss_on(model, held)


def choose_by_loss(candidates: Sequence, counts_of: Callable, loss_of: Callable[[list[int]], float]):
    """(index, losses): the candidate whose counts leave the lowest loss, and every loss.

    Args:
        candidates: allocation families, all meant to meet the same target.
        counts_of: allocation -> its removal counts at the target.
        loss_of: counts -> the pruned model's loss (e.g. `short_finetuned_loss`).
    """
    losses = [loss_of(counts_of(candidate)) for candidate in candidates]
    return min(range(len(losses)), key=lambda i: (losses[i], i)), losses


def choose_latency_allocation(groups, keys, latency: LatencyModel, cost, target: Target,
                              remove: Callable[[list[int]], nn.Module], loader):
    """(allocation, note): the `CANDIDATES` allocation whose pruned model at `target` has the
    lowest `short_finetuned_loss`, and a note of every candidate's loss and the choice.

    Args:
        groups, keys: the channel groups and their importance keys.
        latency, cost: the model's latency and analytic cost models.
        target: the prune's target (a latency target is met as predicted, aiming as
            `latency_target` does; MACs/params targets analytically).
        remove: counts -> a pruned copy of the dense model.
        loader: training batches `(inputs, labels)`.
    """
    candidates = [latency_allocation(groups, keys, latency, weight, thinning)
                  for weight, thinning in CANDIDATES]
    batches = fixed_batches(loader, STEPS + EVAL_BATCHES)

    def counts_of(allocation):
        try:
            if target.kind == "latency_speedup":
                dense = latency.predict([0] * len(groups))
                return solve_counts(allocation, cost, target, dense / (target.value * AIM),
                                    evaluate=latency.predict)
            return solve_counts(allocation, cost, target, target.goal(cost))
        except InvalidTargetError:
            return allocation.counts(allocation.high)

    chosen, losses = choose_by_loss(candidates, counts_of,
                                    lambda counts: short_finetuned_loss(remove(counts), batches))
    note = {"candidates": [{"time_weight": weight, "thinning": thinning, "loss": round(loss, 5)}
                           for (weight, thinning), loss in zip(CANDIDATES, losses)],
            "chosen": chosen}
    return candidates[chosen], note
