"""The meta-training objective that matches pruning: torch-pruning's sparse-learning penalty on
group norms, the dense guard, and selection data kept apart from test data."""

import pytest
import torch

from metaprune import zoo
from metaprune.graph import to_graph
from metaprune.metanet import GroupSparsity


def _graph():
    config = zoo.default_config("mlp", input_shape=(1, 40), num_classes=10, hidden=[6, 5])
    torch.manual_seed(0)
    return to_graph(zoo.build("mlp", config).eval(), zoo.example_inputs(config))


def test_sparse_learning_penalty_weighs_each_layers_weakest_group_by_alpha():
    regularizer = GroupSparsity(_graph())
    values = torch.tensor([1.0, 2.0, 4.0, 3.0, 3.0, 6.0, 1.5, 1.5, 3.0, 3.0, 3.0])
    assert regularizer.num_groups == len(values)  # 6 + 5 hidden channels
    norms = values.clone().requires_grad_(True)
    penalty = regularizer.sparse_learning_penalty(norms, alpha=16.0)
    penalty.backward()
    # gradient = weight * norm: the gradient torch-pruning's regularize() adds (weight * w)
    weight = norms.grad / norms.detach()
    layer = regularizer._group_layer
    for index in layer.unique():
        members = (layer == index).nonzero().flatten()
        values = norms.detach()[members]
        weakest, strongest = members[values.argmin()], members[values.argmax()]
        if values.max() > values.min():
            assert weight[weakest] == pytest.approx(16.0)
            assert weight[strongest] == pytest.approx(1.0)
    assert penalty.item() == pytest.approx(float((weight * norms.detach() ** 2).sum() / 2))


def test_validation_split_is_disjoint_fixed_and_from_the_training_set():
    from metaprune.data import load_dataset
    from metaprune.training.metanet_select import validation_loaders

    fit, score = validation_loaders("digits", seed=0)
    fit_again, score_again = validation_loaders("digits", seed=1)
    score_x = torch.cat([x for x, _ in score])
    assert torch.equal(score_x, torch.cat([x for x, _ in score_again]))  # the same images
    fit_rows = {tuple(row.flatten().tolist()) for x, _ in fit for row in x}
    assert not fit_rows & {tuple(row.flatten().tolist()) for row in score_x}
    data = load_dataset("digits")
    test_rows = {tuple(row.flatten().tolist()) for row in data.x_test}
    assert not test_rows & {tuple(row.flatten().tolist()) for row in score_x}  # never test
    assert len(score_x) == int(len(data.x_train) * 0.2)
    assert torch.cat([y for _, y in fit]).tolist() != torch.cat([y for _, y in fit_again]).tolist()


def test_global_mask_ranks_normalised_norms_across_layers_and_keeps_a_floor():
    regularizer = GroupSparsity(_graph())  # layers of 6 and 5 groups
    layer = regularizer._group_layer
    norms = torch.ones(regularizer.num_groups)
    norms[layer == layer[0]] = torch.tensor([0.1, 0.2, 1.0, 1.0, 1.0, 1.0])
    dropped = regularizer.weakest_groups(norms, 0.5, allocation="global")
    assert int(dropped.sum()) == 5  # half of 11, rounded down
    first = layer == layer[0]
    assert bool(dropped[first][:2].all())  # the two weak groups go first
    # the floor: every layer keeps at least 10 % of its groups (here one group each)
    assert int((~dropped[first]).sum()) >= 1 and int((~dropped[~first]).sum()) >= 1
    uniform = regularizer.weakest_groups(norms, 0.5)
    assert int(uniform[first].sum()) == 3 and int(uniform[~first].sum()) == 2
    gates = regularizer.keep_gates(norms.requires_grad_(), 0.5, allocation="global")
    assert torch.allclose(gates.detach(), (~dropped).float(), atol=1e-6)
