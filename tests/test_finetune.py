"""metaprune.finetune: the loop learns, is seeded, distils from a teacher, recalibrates BN."""

import copy
import logging
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from metaprune.data import load_dataset
from metaprune.errors import InvalidTargetError
from metaprune.finetune import (
    FinetuneConfig,
    distillation_loss,
    evaluate,
    recalibrate_batchnorm,
    train,
)

FAST = FinetuneConfig(optimizer="adamw", lr=3e-3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _mlp(seed: int = 0, *, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 48), nn.Dropout(dropout), nn.BatchNorm1d(48), nn.ReLU(),
        nn.Linear(48, 10),
    )


def test_train_learns_digits_in_seconds(digits, caplog):
    train_loader, test_loader = digits.loaders(64, seed=0)
    model = _mlp().eval()
    seen = []
    started = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="metaprune"):
        history = train(model, train_loader, epochs=5, config=FAST, eval_loader=test_loader,
                        progress=False, on_epoch=seen.append)
    assert time.perf_counter() - started < 30
    assert [record.metrics for record in caplog.records if hasattr(record, "epoch")] == history
    assert [entry["epoch"] for entry in history] == [1, 2, 3, 4, 5] and seen == history
    assert set(history[0]) == {
        "epoch", "train_loss", "train_accuracy", "test_accuracy", "lr", "seconds"
    }
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.9
    assert not model.training  # back in the mode it came in
    assert evaluate(model, test_loader) == pytest.approx(history[-1]["test_accuracy"])


def test_training_is_reproducible_with_a_seed(digits):
    runs = []
    for _ in range(2):
        model = _mlp(seed=1)
        train(model, digits.loaders(64, seed=5)[0], epochs=2, config=FAST, progress=False)
        runs.append(model.state_dict())
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_schedules_shape_the_learning_rate(digits):
    loader = digits.loaders(256, seed=0)[0]
    final_lr = {}
    for schedule in ("cosine", "step", "constant"):
        config = FinetuneConfig(optimizer="sgd", lr=0.1, schedule=schedule, bn_recalibration=False)
        history = train(_mlp(), loader, epochs=4, config=config, progress=False)
        final_lr[schedule] = history[-1]["lr"]
    assert final_lr["cosine"] == pytest.approx(0.0, abs=1e-9)
    assert final_lr["step"] == pytest.approx(0.1 * 0.1 * 0.1)  # decayed at epochs 2 and 3
    assert final_lr["constant"] == pytest.approx(0.1)


def test_evaluate_restores_the_mode_and_refuses_empty_loaders(digits):
    model = _mlp().train()
    accuracy = evaluate(model, digits.loaders(100)[1])
    assert 0.0 <= accuracy <= 1.0 and model.training
    empty = DataLoader(TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(InvalidTargetError, match="no samples"):
        evaluate(model, empty)


# ---------------------------------------------------------------- distillation


def test_distillation_loss_matches_its_formula():
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    labels = torch.randint(0, 5, (8,))
    assert torch.allclose(distillation_loss(student, teacher, labels, alpha=0.0),
                          F.cross_entropy(student, labels))
    assert distillation_loss(teacher, teacher, labels, alpha=1.0).abs() < 1e-6
    temperature = 2.0
    p_teacher = F.softmax(teacher / temperature, dim=-1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / temperature, dim=-1))).sum(-1)
    expected = 0.3 * temperature**2 * kl.mean() + 0.7 * F.cross_entropy(student, labels)
    assert torch.allclose(
        distillation_loss(student, teacher, labels, temperature=temperature, alpha=0.3), expected
    )


def test_distillation_learns_from_the_teacher_not_the_labels(digits):
    train_loader, test_loader = digits.loaders(64, seed=0)
    teacher = _mlp(seed=2)
    train(teacher, train_loader, epochs=5, config=FAST, progress=False)
    # Labels replaced by noise: only the teacher's soft labels carry information.
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 10, digits.y_train.shape, generator=generator)
    noisy_loader = DataLoader(TensorDataset(digits.x_train, noise), batch_size=64, shuffle=True,
                              generator=generator)
    pure_distill = FinetuneConfig(optimizer="adamw", lr=3e-3, distill=True, distill_alpha=1.0)
    student = _mlp(seed=3)
    train(student, noisy_loader, epochs=5, config=pure_distill, teacher=teacher, progress=False)
    without = _mlp(seed=3)
    train(without, noisy_loader, epochs=5, config=FAST, teacher=teacher, progress=False)
    assert evaluate(student, test_loader) > 0.85
    assert evaluate(without, test_loader) < 0.4  # distill=False ignores the teacher


def test_teacher_is_left_unchanged_and_in_its_mode(digits):
    loader = digits.loaders(64)[0]
    teacher = _mlp(seed=4).train()
    before = copy.deepcopy(teacher.state_dict())
    config = FinetuneConfig(distill=True, bn_recalibration=False)
    train(_mlp(seed=5), loader, epochs=1, config=config, teacher=teacher, progress=False)
    assert teacher.training
    for key, value in before.items():
        assert torch.equal(teacher.state_dict()[key], value), key


def test_distill_without_teacher_is_refused(digits):
    with pytest.raises(InvalidTargetError, match="needs a teacher"):
        train(_mlp(), digits.loaders()[0], epochs=1, config={"distill": True}, progress=False)


# ---------------------------------------------------------------- BatchNorm recalibration


def test_recalibration_recovers_corrupted_statistics(digits):
    train_loader, test_loader = digits.loaders(64, seed=0)
    model = _mlp(dropout=0.5)
    train(model, train_loader, epochs=4, config=FAST, progress=False)
    healthy = evaluate(model, test_loader)
    norm = model[3]
    norm.running_mean.fill_(50.0)  # what stale statistics after pruning look like, exaggerated
    norm.running_var.fill_(1e-3)
    assert evaluate(model, test_loader) < healthy - 0.3
    model.train()
    batches = [digits.x_train[i:i + 120] for i in range(0, 360, 120)]
    assert recalibrate_batchnorm(model, [(x, None) for x in batches], batches=3) == 3
    # The cumulative average of per-batch statistics of what reaches the BN in eval mode:
    # dropout stayed off during recalibration.
    with torch.no_grad():
        features = [model[1](model[0](x)) for x in batches]
    expected_mean = torch.stack([f.mean(0) for f in features]).mean(0)
    expected_var = torch.stack([f.var(0) for f in features]).mean(0)
    assert torch.allclose(norm.running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(norm.running_var, expected_var, rtol=1e-4)
    assert norm.momentum == 0.1 and model.training and model[2].training  # modes restored
    assert evaluate(model, test_loader) > healthy - 0.05


def test_recalibration_ignores_models_without_batchnorm(digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    before = copy.deepcopy(model.state_dict())
    assert recalibrate_batchnorm(model, digits.loaders()[0]) == 0
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


def test_train_with_zero_epochs_only_recalibrates(digits):
    model = _mlp()
    weight = model[1].weight.detach().clone()
    assert train(model, digits.loaders(64)[0], epochs=0, progress=False) == []
    assert torch.equal(model[1].weight, weight)
    assert model[3].num_batches_tracked > 0 and model[3].running_mean.abs().sum() > 0


# ---------------------------------------------------------------- configuration


def test_config_defaults_and_per_optimizer_values():
    assert FinetuneConfig.from_dict(None) == FinetuneConfig()
    assert FinetuneConfig().learning_rate() == 0.01
    adamw = FinetuneConfig.from_dict({"optimizer": "adamw", "schedule": "step"})
    assert adamw.learning_rate() == 1e-3 and adamw.decay() == 1e-2
    assert FinetuneConfig.from_dict(adamw.to_dict()) == adamw


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"epochs": 3}, "unknown finetune setting.*'epochs'.*known: optimizer"),
        ({"optimizer": "lion"}, "optimizer must be one of sgd, adamw"),
        ({"schedule": "linear"}, "schedule must be one of cosine, step, constant"),
        ({"lr": -0.1}, r"lr must lie in \(0"),
        ({"lr": "fast"}, "lr must be a number"),
        ({"momentum": 1.0}, r"momentum must lie in \[0.0, 1.0\)"),
        ({"distill_alpha": 1.5}, "distill_alpha must lie in"),
        ({"distill_temperature": 0}, "distill_temperature must lie in"),
        ({"distill": "yes"}, "distill must be true or false"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_config_validation_names_the_problem(settings, message):
    with pytest.raises(InvalidTargetError, match=message):
        FinetuneConfig.from_dict(settings)
    with pytest.raises(ValueError):  # callers that only know ValueError still catch it
        FinetuneConfig.from_dict(settings)


def test_an_on_epoch_exception_stops_training(digits):
    epochs_seen = []

    def cancel_after_two(metrics):
        epochs_seen.append(metrics["epoch"])
        if metrics["epoch"] == 2:
            raise KeyboardInterrupt  # what a cancelled job or a stopped trial raises

    with pytest.raises(KeyboardInterrupt):
        train(_mlp(), digits.loaders(256)[0], epochs=5, config=FAST, progress=False,
              on_epoch=cancel_after_two)
    assert epochs_seen == [1, 2]
