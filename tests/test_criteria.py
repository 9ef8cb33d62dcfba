"""Importance criteria: one interface, gradient statistics that really accumulate."""

import pytest
import torch
import torch_pruning as tp
from torch import nn

from metaprune.criteria import CRITERIA, GradientStatistics, build_criterion
from metaprune.errors import InvalidTargetError, MetaPruneError
from test_prune import _one_thread  # noqa: F401  (autouse fixture: one torch thread)


def _digits_batches(count: int, batch: int = 16):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[: count * batch], dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target[: count * batch], dtype=torch.long)
    return [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(count)]


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10))


def _first_group(model):
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 64))
    return DG.get_pruning_group(model[0], tp.prune_linear_out_channels, list(range(12)))


def _per_sample_squared_grads(model, batches, samples_per_batch):
    """The hand computation: one backward pass per example, squared, averaged."""
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    count = 0
    for inputs, labels in batches:
        for row in range(samples_per_batch):
            model.zero_grad()
            nn.functional.cross_entropy(model(inputs[row:row + 1]), labels[row:row + 1]).backward()
            for name, p in model.named_parameters():
                total[name] += p.grad.pow(2)
            count += 1
    model.zero_grad(set_to_none=True)
    return {name: value / count for name, value in total.items()}


def test_gradient_statistics_average_every_accumulated_sample():
    model = nn.Linear(3, 2)
    stats = GradientStatistics()
    grads = [torch.full_like(model.weight, 1.0), torch.full_like(model.weight, 3.0)]
    for grad in grads:
        model.weight.grad = grad.clone()
        model.bias.grad = None
        stats.accumulate(model)
    assert stats.samples("weight") == 2 and stats.samples("bias") == 0
    assert torch.allclose(stats.mean_gradient("weight"), torch.full_like(model.weight, 2.0))
    assert torch.allclose(stats.mean_squared_gradient("weight"), torch.full_like(model.weight, 5.0))


def test_hessian_accumulates_over_batches_and_matches_hand_computation():
    batches = _digits_batches(3)
    scores = {}
    for k in (1, 3):
        model = _mlp()
        criterion = build_criterion("hessian", normalizer="none", max_batches=k)
        criterion.prepare(model, batches)
        scores[k] = criterion(_first_group(model))
    assert not torch.allclose(scores[1], scores[3])

    # OBD by hand: sum over the channel's weights of w^2 * E[g^2], for the out-rows of layer 0,
    # the in-columns of layer 2, averaged over the two layers (group_reduction="mean").
    model = _mlp()
    fisher = _per_sample_squared_grads(model, batches, samples_per_batch=16)
    w0, w2 = model[0].weight.detach(), model[2].weight.detach()
    out_part = (w0.pow(2) * fisher["0.weight"]).sum(1)
    in_part = (w2.pow(2) * fisher["2.weight"]).sum(0)
    expected = (out_part + in_part) / 2
    assert torch.allclose(scores[3], expected, rtol=1e-4, atol=1e-10)


def test_taylor_uses_the_mean_gradient_of_all_batches():
    batches = _digits_batches(2)
    model = _mlp()
    criterion = build_criterion("taylor", normalizer="none", max_batches=2)
    criterion.prepare(model, batches)
    got = criterion(_first_group(model))

    reference = _mlp()
    grads = {name: torch.zeros_like(p) for name, p in reference.named_parameters()}
    for inputs, labels in batches:
        reference.zero_grad()
        nn.functional.cross_entropy(reference(inputs), labels).backward()
        for name, p in reference.named_parameters():
            grads[name] += p.grad / len(batches)
    w0, w2 = reference[0].weight.detach(), reference[2].weight.detach()
    expected = ((w0 * grads["0.weight"]).abs().sum(1) + (w2 * grads["2.weight"]).abs().sum(0)) / 2
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-10)


def test_gradient_criterion_refuses_to_score_without_data():
    with pytest.raises(MetaPruneError, match="needs gradient statistics"):
        build_criterion("taylor")(_first_group(_mlp()))


def test_unknown_criterion_names_the_valid_ones():
    with pytest.raises(InvalidTargetError, match="valid criteria: l1, l2, bn_scale"):
        build_criterion("l3")
    with pytest.raises(InvalidTargetError, match="normaliser"):
        build_criterion("l2", normalizer="median")


def test_every_criterion_scores_every_channel_of_a_group():
    batches = _digits_batches(1)
    for name in CRITERIA:
        model = _mlp()
        criterion = build_criterion(name)
        if criterion.needs_data:
            criterion.prepare(model, batches)
        scores = criterion(_first_group(model))
        assert scores.shape == (12,), name
        assert torch.isfinite(scores).all(), name
