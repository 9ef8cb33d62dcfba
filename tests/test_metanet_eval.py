"""The figures `metaprune metanet evaluate` reports: dropped energy and the run summary."""

import math

import pytest
import torch

from metaprune import zoo
from metaprune.graph import to_graph
from metaprune.metanet import GroupSparsity
from metaprune.training.metanet_eval import (
    dropped_energy,
    mean_and_error,
    paired_difference,
    summarize_runs,
)
from metaprune.training.metatrain_tasks import dropped_fraction


def test_mean_and_standard_error():
    assert mean_and_error([0.5]) == (0.5, 0.0)
    mean, error = mean_and_error([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert error == pytest.approx(math.sqrt(5 / 3) / 2)


def test_summary_averages_seeds_per_model_then_takes_the_error_over_models():
    runs = [
        {"speedup": 2.0, "method": "l2", "model": "a", "seed": 0, "accuracy": 0.8},
        {"speedup": 2.0, "method": "l2", "model": "a", "seed": 1, "accuracy": 0.9},
        {"speedup": 2.0, "method": "l2", "model": "b", "seed": 0, "accuracy": 0.6},
        {"speedup": 2.0, "method": "l2", "model": "b", "seed": 1, "accuracy": 0.7},
        {"speedup": 3.0, "method": "l2", "model": "a", "seed": 0, "accuracy": 0.5},
    ]
    rows = summarize_runs(runs)
    assert [(row["speedup"], row["method"]) for row in rows] == [(2.0, "l2"), (3.0, "l2")]
    assert rows[0]["mean"] == pytest.approx(0.75)
    assert rows[0]["error"] == pytest.approx(0.1)  # models at 0.85 and 0.65
    assert (rows[0]["models"], rows[0]["runs"]) == (2, 4)
    assert (rows[1]["models"], rows[1]["error"]) == (1, 0.0)


def test_paired_difference_compares_the_same_model_and_seed():
    runs = [
        {"speedup": 2.0, "method": method, "model": model, "seed": seed, "accuracy": value}
        for method, model, seed, value in [
            ("l2", "a", 0, 0.80), ("new", "a", 0, 0.82), ("l2", "a", 1, 0.70),
            ("new", "a", 1, 0.74), ("l2", "b", 0, 0.50), ("new", "b", 0, 0.49),
            ("new", "c", 0, 0.99),  # no baseline run: not paired
        ]
    ]
    mean, error, models = paired_difference(runs, 2.0, "new", "l2")
    assert models == 2
    assert mean == pytest.approx((0.03 - 0.01) / 2)  # model a: +0.02 and +0.04; b: -0.01
    assert error == pytest.approx(0.02)
    assert paired_difference(runs, 3.0, "new", "l2") == (0.0, 0.0, 0)


def test_fading_the_weakest_channels_lowers_the_dropped_energy():
    config = zoo.default_config("mlp", input_shape=(1, 40), num_classes=10, hidden=[16, 12])
    torch.manual_seed(0)
    graph = to_graph(zoo.build("mlp", config).eval(), zoo.example_inputs(config))
    x, edge_attr = graph.data.x, graph.data.edge_attr
    before = dropped_energy(graph, x, edge_attr, 2.0)
    assert 0 < before < 1
    regularizer = GroupSparsity(graph)
    weakest = regularizer.weakest_groups(regularizer.group_norms(x, edge_attr),
                                         dropped_fraction(2.0))
    # gates of 0.5 on exactly the groups a 2x prune drops
    faded = regularizer.drop_groups(x, edge_attr, torch.where(weakest, 0.5, 1.0))
    assert dropped_energy(graph, *faded, 2.0) < before
