"""Prune + fine-tune on real data: a trained MNIST-1D CNN keeps its accuracy at 2x."""

import pytest
import torch

from metaprune import zoo
from metaprune.data import load_dataset
from metaprune.finetune import FinetuneConfig, evaluate, train
from metaprune.pruning import prune
from test_prune import _one_thread  # noqa: F401  (autouse fixture: one torch thread)


@pytest.fixture(scope="module")
def trained_cnn():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the per-test one-thread fixture
    torch.manual_seed(0)
    train_loader, test_loader = load_dataset("mnist1d").loaders(128, seed=0)
    config = zoo.default_config("cnn1d", input_shape=(1, 40), num_classes=10)
    model = zoo.build("cnn1d", config)
    train(model, train_loader, epochs=15, config=FinetuneConfig(optimizer="adamw", lr=3e-3),
          progress=False)
    yield model, (train_loader, test_loader)
    torch.set_num_threads(threads)


def test_l2_at_2x_with_5_finetune_epochs_stays_within_2_points(trained_cnn):
    model, loaders = trained_cnn
    dense_accuracy = evaluate(model, loaders[1])
    assert dense_accuracy > 0.6  # a trained model, or the comparison means nothing
    result = prune(model, (torch.randn(1, 1, 40),), method="l2", speedup=2.0, data=loaders,
                   finetune_epochs=5, finetune={"optimizer": "adamw", "lr": 1e-3})
    report = result.report
    assert abs(report["speedup"] / 2 - 1) <= 0.02
    assert report["accuracy_before"] == pytest.approx(dense_accuracy)
    assert report["accuracy_after"] >= dense_accuracy - 0.02
    assert report["finetune"]["epochs_after_prune"] == 5
    assert report["finetune_skipped_reason"] is None
    assert len(report["finetune"]["history"]) == 5


def test_gradient_criteria_use_the_data(trained_cnn):
    model, loaders = trained_cnn
    for criterion in ("taylor", "hessian"):
        report = prune(model, (torch.randn(1, 1, 40),), criterion=criterion, speedup=2.0,
                       data=loaders).report
        assert report["criterion"] == criterion
        assert report["accuracy_after"] is not None
        assert report["finetune"] is None and report["finetune_skipped_reason"]
