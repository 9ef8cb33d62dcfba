"""The training loop used to fine-tune pruned networks and to train the zoo's corpus models."""

import logging
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from metaprune.data.text_corpus import IGNORED  # unmasked tokens: not scored
from metaprune.errors import InvalidTargetError
from metaprune.finetune.batchnorm import recalibrate_batchnorm
from metaprune.finetune.config import FinetuneConfig
from metaprune.finetune.device import model_device
from metaprune.finetune.distill import distillation_loss
from metaprune.seeding import seed_everything

# A child of the "metaprune" logger: the service forwards records carrying `epoch` and
# `metrics` as progress events, so every caller of train() reports progress without plumbing.
log = logging.getLogger(__name__)

# Batches used to re-estimate BatchNorm statistics after the last epoch: enough for a stable
# cumulative average on the small datasets here, a fraction of an epoch's cost.
RECALIBRATION_BATCHES = 50


def train(
    model: nn.Module,
    train_loader: DataLoader,
    *,
    epochs: int,
    config: FinetuneConfig | dict | None = None,
    eval_loader: DataLoader | None = None,
    teacher: nn.Module | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train a classifier ``model(x) -> logits`` in place for ``epochs`` epochs.

    Returns one dict per epoch: ``epoch`` (1-based), ``train_loss``, ``train_accuracy`` (both
    averaged over the epoch's batches, weighted by batch size), ``test_accuracy`` (on
    ``eval_loader`` after the epoch, or None), ``lr`` (at the epoch's end) and ``seconds``.
    ``on_epoch`` receives each dict as soon as it exists (progress events, Ray Tune reports);
    each epoch is also logged at INFO on ``metaprune.finetune.loop`` with the dict attached as
    the record's ``metrics`` (and ``epoch``) attribute. An exception raised by ``on_epoch``
    stops training (that is how a caller cancels it). The model ends in the training/eval mode
    it came in.

    With ``config.distill`` the loss is :func:`distillation_loss` against ``teacher`` (held in
    eval mode, never updated). With ``config.bn_recalibration`` BatchNorm statistics are
    re-estimated after the last epoch, before its evaluation (with ``epochs=0`` that is all
    that happens). A tqdm bar is drawn when ``progress`` is true and stderr is a terminal.

    Example::

        from metaprune.data import load_dataset
        from metaprune.finetune import FinetuneConfig, train
        train_loader, test_loader = load_dataset("digits").loaders(batch_size=64)
        history = train(model, train_loader, epochs=5, eval_loader=test_loader,
                        config=FinetuneConfig(optimizer="adamw", lr=3e-3))
        history[-1]["test_accuracy"]        # e.g. 0.95
    """
    config = config if isinstance(config, FinetuneConfig) else FinetuneConfig.from_dict(config)
    if epochs < 0:
        raise InvalidTargetError(f"epochs must be >= 0, got {epochs}")
    if config.distill and teacher is None:
        raise InvalidTargetError("finetune distill=true needs a teacher model; none was given")
    seed_everything(config.seed)
    steps_per_epoch = len(train_loader)
    optimizer = _make_optimizer(model, config)
    scheduler = _make_scheduler(optimizer, config.schedule, epochs * steps_per_epoch, epochs)
    device = model_device(model)
    model_mode = model.training
    teacher_mode = teacher.training if teacher is not None else None
    if teacher is not None:
        teacher.eval()
    bar = _progress_bar(epochs * steps_per_epoch) if progress else None
    history = []
    try:
        for epoch in range(1, epochs + 1):
            started = time.perf_counter()
            loss, accuracy = _train_one_epoch(
                model, train_loader, optimizer, scheduler, config,
                teacher if config.distill else None, device, bar,
            )
            if epoch == epochs and config.bn_recalibration:
                recalibrate_batchnorm(model, train_loader, batches=RECALIBRATION_BATCHES)
            metrics = {
                "epoch": epoch,
                "train_loss": loss,
                "train_accuracy": accuracy,
                "test_accuracy": evaluate(model, eval_loader) if eval_loader is not None else None,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - started,
            }
            history.append(metrics)
            log.info(
                "epoch %d/%d: train loss %.4f, train accuracy %.4f, test accuracy %s",
                epoch, epochs, loss, accuracy,
                "n/a" if metrics["test_accuracy"] is None else f"{metrics['test_accuracy']:.4f}",
                extra={"epoch": epoch, "metrics": dict(metrics)},
            )
            if bar is not None:
                bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}", acc=f"{accuracy:.3f}")
            if on_epoch is not None:
                on_epoch(dict(metrics))
        if epochs == 0 and config.bn_recalibration:
            recalibrate_batchnorm(model, train_loader, batches=RECALIBRATION_BATCHES)
    finally:
        if bar is not None:
            bar.close()
        model.train(model_mode)
        if teacher is not None:
            teacher.train(teacher_mode)
    return history


def _train_one_epoch(model, loader, optimizer, scheduler, config, teacher, device, bar):
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for inputs, labels in loader:
        inputs, labels = inputs.to(device), labels.to(device)
        logits, labels = scored_rows(model(inputs), labels)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits, _ = scored_rows(teacher(inputs), labels)
            loss = distillation_loss(
                logits, teacher_logits, labels,
                temperature=config.distill_temperature, alpha=config.distill_alpha,
            )
        else:
            loss = F.cross_entropy(logits, labels)
        if not torch.isfinite(loss):
            raise InvalidTargetError(
                f"the training loss diverged to {loss.item()}; lower the learning rate "
                f"(lr={config.learning_rate()})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        scored = labels != IGNORED
        total_loss += loss.item() * int(scored.sum())
        correct += (logits.argmax(dim=-1) == labels)[scored].sum().item()
        seen += int(scored.sum())
        if bar is not None:
            bar.update(1)
    if seen == 0:
        raise InvalidTargetError("the training loader yielded no batches")
    return total_loss / seen, correct / seen


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of ``model`` on ``loader`` as a fraction in [0, 1] (eval mode, no grad).

    The model's training/eval mode is restored afterwards.

    Example::

        accuracy = evaluate(model, test_loader)   # 0.947
    """
    correct, seen = 0, 0
    for logits, labels in _scored_batches(model, loader):
        scored = labels != IGNORED
        correct += (logits.argmax(dim=-1) == labels)[scored].sum().item()
        seen += int(scored.sum())
    if seen == 0:
        raise InvalidTargetError("the evaluation loader yielded no samples")
    return correct / seen


@torch.no_grad()
def perplexity(model: nn.Module, loader: DataLoader) -> float:
    """exp(mean cross-entropy) of a language model over the labelled tokens of ``loader``.

    A uniform guess over V tokens scores V. The model's training/eval mode is restored.

    Example::

        train_loader, test_loader = text_loaders(length=64, masked=False)
        perplexity(model, test_loader)     # e.g. 7.7 (the corpus has 92 characters)
    """
    total, seen = 0.0, 0
    for logits, labels in _scored_batches(model, loader):
        total += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        seen += int((labels != IGNORED).sum())
    if seen == 0:
        raise InvalidTargetError("the evaluation loader yielded no labelled tokens")
    return math.exp(total / seen)


def _scored_batches(model: nn.Module, loader):
    """``(logits, labels)`` rows of every batch, the model in eval mode (its mode restored)."""
    was_training = model.training
    device = model_device(model)
    model.eval()
    try:
        for inputs, labels in loader:
            yield scored_rows(model(inputs.to(device)), labels.to(device))
    finally:
        model.train(was_training)


def scored_rows(output, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [N, classes], labels [N])`` of a model's output, one row per label.

    The output is a logits tensor or a transformers output with ``.logits``; a language model's
    ``[B, T, V]`` logits and ``[B, T]`` labels become ``B * T`` rows (positions labelled
    IGNORED are skipped by the loss and the accuracy). A classifier's rows pass unchanged.
    """
    logits = output.logits if hasattr(output, "logits") else output
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)


def _make_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise InvalidTargetError("the model has no trainable parameters")
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.learning_rate(), weight_decay=config.decay())
    return torch.optim.SGD(
        parameters, lr=config.learning_rate(), momentum=config.momentum,
        weight_decay=config.decay(), nesterov=config.momentum > 0,
    )


def _make_scheduler(optimizer, schedule: str, total_steps: int, epochs: int):
    """A per-step scheduler: cosine to zero over all steps, x0.1 at 50 %/75 %, or constant."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    if schedule == "step":
        steps_per_epoch = total_steps // max(epochs, 1)
        decay_epochs = {max(1, int(epochs * share)) for share in (0.5, 0.75)}
        milestones = sorted(epoch * steps_per_epoch for epoch in decay_epochs)
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _progress_bar(total: int):
    if not sys.stderr.isatty() or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="batch", leave=False, file=sys.stderr)
