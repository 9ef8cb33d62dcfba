"""What a new user trips over in `prune()` (issue #15): data shapes that differ by size-1
dimensions, `exclude`, `latency=False`, options of DESIGN §6 this build refuses clearly, and a
report that records the version, the seed and the metanetwork checkpoint's hash."""

import hashlib
import json

import pytest
import torch
from torch import nn

import metaprune
from metaprune.data.adapt import DatasetShapeError, adaptation
from metaprune.errors import InvalidTargetError, MetaPruneError
from metaprune.pruning import engine, prune
from test_prune import _one_thread, tiny_model  # noqa: F401  (autouse fixture: one torch thread)


class FlatMnist1dCNN(nn.Module):
    """A standard MNIST-1D model: it takes [B, 40], as the mnist1d package's examples do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, 16, 5, padding=2)
        self.conv2 = nn.Conv1d(16, 32, 5, padding=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x.unsqueeze(1)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(-1))


def test_samples_differing_by_a_size_one_dimension_are_reshaped_and_reported():
    """Before: RuntimeError "Expected 2D (unbatched) or 3D (batched) input to conv1d, but got
    input of size: [128, 1, 1, 40]" (the dataset yields [B, 1, 40])."""
    report = prune(FlatMnist1dCNN(), (torch.randn(1, 40),), speedup=2.0, data="mnist1d",
                   latency=False).report
    assert report["accuracy_before"] is not None and report["accuracy_after"] is not None
    assert report["input_adaptation"] == ("samples [1, 40] reshaped to the model's [40] "
                                          "(size-1 dimensions removed)")


def test_any_other_shape_mismatch_is_refused_before_any_work(monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the shapes were checked")

    monkeypatch.setattr(engine, "count_macs", no_work)
    with pytest.raises(DatasetShapeError, match=r"\[1, 40\].*\[8, 5\]"):
        prune(FlatMnist1dCNN(), (torch.randn(1, 8, 5),), speedup=2.0, data="mnist1d")
    assert adaptation((40,), (1, 1, 40)).endswith("(size-1 dimensions inserted)")
    assert adaptation((3, 8), (3, 8)) is None
    with pytest.raises(DatasetShapeError, match=r"\[8, 3\].*\[3, 8\]"):
        adaptation((8, 3), (3, 8))  # same numbers, another order: never guessed


def test_tune_trials_get_the_same_reshaped_data():
    from metaprune.training.tune import run_trial, trial_loaders

    example_inputs = (torch.randn(1, 40),)
    loaders, note = trial_loaders("mnist1d", example_inputs)
    assert note and "[40]" in note
    metrics = run_trial(FlatMnist1dCNN(), example_inputs, loaders, {"conv1": 0.5, "conv2": 0.5},
                        2.0, finetune_epochs=0)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and abs(metrics["speedup"] / 2.0 - 1) <= 0.02


def test_exclude_leaves_named_modules_untouched():
    model, example_inputs = tiny_model("vgg")
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    result = prune(model, example_inputs, speedup=1.5, exclude=[convs[0]], latency=False)
    pruned = dict(result.model.named_modules())
    assert pruned[convs[0]].weight.shape == dict(model.named_modules())[convs[0]].weight.shape
    assert result.report["kept"][convs[0]][0] == result.report["kept"][convs[0]][1]
    assert result.report["excluded"] == [convs[0]]
    assert abs(result.report["speedup"] / 1.5 - 1) <= 0.02
    with pytest.raises(InvalidTargetError, match="exclude names module 'nope'"):
        prune(model, example_inputs, speedup=1.5, exclude=["nope"])


def test_latency_false_skips_the_measurement(monkeypatch):
    from metaprune.latency.timing import compare_latency
    from metaprune.pruning import latency_target

    model, example_inputs = tiny_model("mlp")
    calls = []

    def counted(models, inputs, **options):
        calls.append(options["batch"])
        return compare_latency(models, inputs, **{**options, "budget_s": 0.1})
    monkeypatch.setattr(latency_target, "compare_latency", counted)
    report = prune(model, example_inputs, speedup=2.0, latency=False).report
    assert calls == [] and report["latency_ms_before"] is None and report["latency_batch"] is None
    report = prune(model, example_inputs, speedup=2.0, latency_batch=8).report
    assert calls == [8] and report["latency_batch"] == 8  # dense and pruned timed together


def test_report_records_version_seed_and_metanet_hash():
    from metaprune.metanet.scope import select_metanet
    from metaprune.pruning.metanet_bridge import default_checkpoint

    model, example_inputs = tiny_model("mlp")
    report = prune(model, example_inputs, speedup=2.0, finetune={"seed": 3}, latency=False).report
    assert report["version"] == metaprune.__version__ and report["seed"] == 3
    assert report["metanet"] is None and report["report_format"] == 2
    assert (report["macs_before"], report["macs_after"]) == (report["flops_before"],
                                                             report["flops_after"])
    path = default_checkpoint()
    _, entry = select_metanet("default", model)  # what the engine reports with a metanetwork
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry["name"] == path.stem and entry["reason"]


def test_report_schema_refuses_keys_it_does_not_define():
    from metaprune.report import build_report

    with pytest.raises(TypeError, match="outside the report schema"):
        build_report(flops_before=1)
    with pytest.raises(TypeError, match="missing required keys"):
        build_report(version="0")


def test_the_committed_checkpoint_records_no_machine_paths():
    """Issue #15 item 6: metanet.json recorded /work/corpus, /work/runs/... of the trainer."""
    from metaprune.vocabulary import CHECKPOINT_DIR

    def strings(value):
        if isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)
        elif isinstance(value, str):
            yield value

    for config in CHECKPOINT_DIR.glob("*.json"):
        absolute = [text for text in strings(json.loads(config.read_text()))
                    if text.startswith(("/", "~")) or ":\\" in text]
        assert absolute == [], f"{config.name} records machine paths: {absolute}"
