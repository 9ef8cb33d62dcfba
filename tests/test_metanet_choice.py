"""`prune(method="metanet")` chooses among the sparsity head's, the measured and uniform
allocations by the loss on training batches, dropping candidates that miss the target."""

import copy
import math

import pytest
import torch

from metaprune import zoo
from metaprune.data import load_dataset
from metaprune.metanet import load_metanet
from metaprune.pruning import metanet_choice, prune
from metaprune.pruning.metanet_choice import (
    Candidate,
    blended_policy,
    candidates_for,
    choose_candidate,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the choice runs many tiny passes


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


def test_blended_policies_run_from_uniform_allocation_to_the_proposal():
    head = {"a": 0.25, "b": 0.64, "c": 1.0}
    assert blended_policy(head, 0.5, 0.0) == {"a": 0.5, "b": 0.5, "c": 0.5}
    assert blended_policy(head, 0.5, 1.0) == head
    halfway = blended_policy(head, 0.5, 0.5)
    assert halfway["a"] == pytest.approx(math.sqrt(0.5 * 0.25))
    assert halfway["c"] == pytest.approx(math.sqrt(0.5))


def test_candidates_depend_on_the_budget_and_on_whether_a_head_answered():
    names = lambda candidates: [c.name for c in candidates]  # noqa: E731
    assert names(candidates_for(0, head=True)) == [
        "uniform", "head@0.5", "head@1", "measured@1", "measured@0.5"]
    # with fine-tuning to follow, half way only (measured on validation)
    assert names(candidates_for(4, head=True)) == ["uniform", "head@0.5", "measured@0.5"]
    assert names(candidates_for(0, head=False)) == ["uniform", "measured@1", "measured@0.5"]
    assert names(candidates_for(0, head=True, head_strengths=(0.5,))) == ["head@0.5"]


def test_a_candidate_that_misses_the_target_is_dropped_even_with_the_lowest_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    scales = {"uniform": 1.0, "head@1": 0.0, "measured@1": 0.5}  # head@1: all-zero logits

    def remove(counts):  # counts here: which candidate; its model's logits scaled
        pruned = copy.deepcopy(model)
        with torch.no_grad():
            pruned[0].weight.mul_(counts[0])
            pruned[0].bias.mul_(counts[0])
        return pruned

    candidates = [Candidate("uniform", 0.0), Candidate("head", 1.0), Candidate("measured", 1.0)]
    policies = [(c, {"scale": scales[c.name]}) for c in candidates]
    losses = {c.name: metanet_choice.recalibrated_loss(remove([scales[c.name]]), batches[:1],
                                                       batches[1:]) for c in candidates}
    best = min(losses, key=losses.get)
    index, note = choose_candidate(
        policies, counts_of=lambda policy: [policy["scale"]], remove=remove,
        meets_target=lambda pruned: not torch.equal(pruned[0].weight,
                                                    remove([scales[best]])[0].weight),
        calibration=batches[:1], scoring=batches[1:])
    dropped = next(e for e in note["candidates"] if e["candidate"] == best)
    assert dropped["loss"] is None and "misses the target" in dropped["dropped"]
    assert note["candidate"] != best
    kept = [e for e in note["candidates"] if e["dropped"] is None]
    assert note["candidates"][index]["loss"] == min(e["loss"] for e in kept)


def test_the_choice_takes_the_lowest_training_loss_and_reaches_the_target(model_and_data):
    report = _report(model_and_data, epochs=0)
    choice = report["metanet"]["allocation_choice"]
    assert [c["candidate"] for c in choice["candidates"]] == [
        c.name for c in metanet_choice.CANDIDATES]
    losses = [c["loss"] for c in choice["candidates"] if c["dropped"] is None]
    assert len(losses) >= 2 and all(math.isfinite(loss) for loss in losses)
    assert choice["candidates"][choice["chosen"]]["loss"] == min(losses)
    assert choice["measured"]["groups"] == 2  # both convs of the cnn1d measured
    assert "no optimiser step" in choice["scored_on"] and report["finetune"] is None
    assert report["allocation"] == "metanet" and abs(report["speedup"] / 2.0 - 1) <= 0.02


def test_a_fixed_strength_is_the_head_alone_and_a_budget_narrows_the_candidates(
        model_and_data):
    fixed = _report(model_and_data, epochs=0, metanet=FixedStrength(1.0))
    assert fixed["metanet"]["allocation_choice"]["candidate"] == "head@1"
    assert fixed["metanet"]["allocation_choice"]["scored_on"] is None  # nothing to compare
    report = _report(model_and_data, epochs=1)
    choice = report["metanet"]["allocation_choice"]
    assert [c["candidate"] for c in choice["candidates"]] == [
        "uniform", "head@0.5", "measured@0.5"]
    assert choice["measured"]["reused"]  # the same model and batches were measured above
    assert report["finetune"]["epochs_after_prune"] == 1
    assert report["finetune"]["epochs_after_metanet"] == 0


def test_a_measurement_over_its_budget_drops_the_measured_candidates(model_and_data,
                                                                      monkeypatch):
    from metaprune.pruning import engine

    monkeypatch.setattr(engine, "MEASUREMENT_BUDGET_S", 0.0)  # any measurement is too long
    model, inputs, loaders = model_and_data
    data = loaders()
    # a fresh shuffle seed: a cached measurement of the same batches would skip the estimate
    data = (torch.utils.data.DataLoader(data[0].dataset, batch_size=64, shuffle=True,
                                        generator=torch.Generator().manual_seed(7)), data[1])
    report = prune(model, inputs, method="metanet", speedup=2.0, data=data,
                   finetune_epochs=0, latency=False).report
    choice = report["metanet"]["allocation_choice"]
    assert [c["candidate"] for c in choice["candidates"]] == ["uniform", "head@0.5", "head@1"]
    assert "skipped" in choice["measured"]["skipped"] and choice["measured"]["budget_s"] == 0.0
    assert abs(report["speedup"] / 2.0 - 1) <= 0.02


def test_bench_runs_of_a_new_choice_are_new_runs(monkeypatch):
    from metaprune.bench.metanet import checkpoint_identity, null_identity

    _, before = checkpoint_identity("default")
    null_before = null_identity()
    monkeypatch.setattr(metanet_choice, "CHOICE_ID", metanet_choice.CHOICE_ID + "|changed")
    assert checkpoint_identity("default")[1] != before
    assert null_identity() != null_before  # the null row runs the choice too
