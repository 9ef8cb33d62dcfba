"""`prune(method="metanet")` follows the sparsity head as far as training batches say."""

import math

import pytest
import torch

from metaprune import zoo
from metaprune.data import load_dataset
from metaprune.metanet import load_metanet
from metaprune.pruning import metanet_choice, prune
from metaprune.pruning.metanet_choice import blended_policy, strengths_for


class FixedStrength:
    """The committed metanetwork with one head strength: no choice left to the engine."""

    head_trained, rewrites_weights = True, False

    def __init__(self, strength: float):
        self.loaded, self.head_strengths = load_metanet("default"), (strength,)

    def transform(self, module, example_inputs):
        return self.loaded.transform(module, example_inputs)

    def layer_keep_ratios(self, module, example_inputs, **target):
        return self.loaded.layer_keep_ratios(module, example_inputs, **target)


@pytest.fixture(scope="module")
def model_and_data():
    config = zoo.default_config("cnn1d", input_shape=(1, 40), num_classes=10, widths=[16, 24])
    torch.manual_seed(0)
    model = zoo.build("cnn1d", config).eval()
    data = load_dataset("mnist1d")
    return model, zoo.example_inputs(config), lambda: data.loaders(128, seed=0,
                                                                   train_subset=1536)


def _report(model_and_data, *, epochs: int, metanet="default") -> dict:
    model, inputs, loaders = model_and_data
    return prune(model, inputs, method="metanet", metanet=metanet, speedup=2.0, data=loaders(),
                 finetune_epochs=epochs, latency=False).report


def test_blended_policies_run_from_uniform_allocation_to_the_head():
    head = {"a": 0.25, "b": 0.64, "c": 1.0}
    assert blended_policy(head, 0.5, 0.0) == {"a": 0.5, "b": 0.5, "c": 0.5}
    assert blended_policy(head, 0.5, 1.0) == head
    halfway = blended_policy(head, 0.5, 0.5)
    assert halfway["a"] == pytest.approx(math.sqrt(0.5 * 0.25))
    assert halfway["c"] == pytest.approx(math.sqrt(0.5))
    # with fine-tuning to follow, uniform or half way (measured on validation)
    assert strengths_for(0) == metanet_choice.STRENGTHS and 0.5 in strengths_for(0)
    assert strengths_for(4) == metanet_choice.STRENGTHS_FINETUNED == (0.0, 0.5)


def test_the_chosen_strength_has_the_lowest_training_loss_and_is_the_prune_returned(
        model_and_data):
    report = _report(model_and_data, epochs=0)
    choice = report["metanet"]["allocation_choice"]
    losses = [candidate["loss"] for candidate in choice["candidates"]]
    assert [c["head_strength"] for c in choice["candidates"]] == list(metanet_choice.STRENGTHS)
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[choice["chosen"]] == min(losses)
    assert "no optimiser step" in choice["scored_on"] and report["finetune"] is None
    assert abs(report["speedup"] / 2.0 - 1) <= 0.02
    # the returned model is the one pruned with the chosen strength alone
    fixed = _report(model_and_data, epochs=0, metanet=FixedStrength(choice["head_strength"]))
    assert fixed["kept"] == report["kept"]
    assert fixed["accuracy_after"] == report["accuracy_after"]


def test_a_budget_to_follow_narrows_the_candidates_and_the_budget_is_spent_after_pruning(
        model_and_data):
    report = _report(model_and_data, epochs=1)
    choice = report["metanet"]["allocation_choice"]
    assert [c["head_strength"] for c in choice["candidates"]] == [0.0, 0.5]
    assert report["finetune"]["epochs_after_prune"] == 1
    assert report["finetune"]["epochs_after_metanet"] == 0


def test_bench_runs_of_a_new_choice_are_new_runs(monkeypatch):
    from metaprune.bench.metanet import checkpoint_identity

    _, before = checkpoint_identity("default")
    monkeypatch.setattr(metanet_choice, "CHOICE_ID", metanet_choice.CHOICE_ID + "|changed")
    assert checkpoint_identity("default")[1] != before
