"""Corpus models as meta-training tasks: loaded once, graph and regulariser cached, and the
meta-training loss of one step.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch.nn import functional as F

from metaprune.data import load_dataset
from metaprune.errors import InvalidTargetError
from metaprune.formats import load_model
from metaprune.graph import to_graph
from metaprune.metanet import GroupSparsity, parameters_from_features
from metaprune.training.corpus_store import finished_metadata


class _Task:
    """One corpus model ready for meta-training steps."""

    def __init__(self, model, example_inputs, graph, regularizer, reg_scale, batches,
                 sparse_scale=1.0):
        self.model = model
        self.example_inputs = example_inputs
        self.graph = graph
        self.regularizer = regularizer
        self.reg_scale = reg_scale  # the regulariser on the original weights
        self.sparse_scale = sparse_scale  # the sparse-learning penalty on the original weights
        self._batches = batches  # an endless iterator over the training loader

    def next_batch(self):
        return next(self._batches)


def _endless(loader):
    while True:
        yield from loader


@functools.lru_cache(maxsize=8)
def _dataset(name: str, cache: str | None):
    # `cache` keys the entry so a changed $METAPRUNE_CACHE is honoured.
    return load_dataset(name)


class CorpusTasks:
    """The models of a corpus folder, split into training and held-out ids, loaded lazily.

    Args:
        folder: the corpus folder (``ID.safetensors`` + ``ID.json`` + ``ID.meta.json``).
        families, datasets: keep only these (empty or None: all).
        max_models: keep at most this many training models (None: all).
        batch_size: training batch size of every model's loader.

    Example::

        tasks = CorpusTasks("/work/corpus", datasets=["mnist1d"])
        loss, task_loss, reg = meta_loss(metanet, tasks, tasks.train_ids[0], 2.0, lam=0.1)
    """

    def __init__(self, folder, *, families=None, datasets=None, max_models=None,
                 batch_size: int = 64):
        self.folder = Path(folder)
        self.batch_size = batch_size
        metadata = finished_metadata(self.folder)
        kept = {
            model_id: meta for model_id, meta in sorted(metadata.items())
            if (not families or meta["family"] in families)
            and (not datasets or meta["dataset"] in datasets)
        }
        if not kept:
            raise InvalidTargetError(
                f"no corpus model in {self.folder} (families {families or 'all'}, "
                f"datasets {datasets or 'all'})")
        self.meta = kept
        self.train_ids = [key for key, meta in kept.items() if not meta.get("held_out")]
        self.held_out_ids = [key for key, meta in kept.items() if meta.get("held_out")]
        if max_models is not None:
            self.train_ids = self.train_ids[:max_models]
        self._tasks: dict[str, _Task] = {}

    def model(self, model_id: str):
        """A fresh (model, example_inputs) of a corpus model, in eval mode."""
        model, example_inputs = load_model(self.folder / self.meta[model_id]["weights"])
        return model.eval(), example_inputs

    def loaders(self, model_id: str):
        """(train_loader, test_loader) of the model's dataset, with its recorded subset."""
        meta = self.meta[model_id]
        data = _dataset(meta["dataset"], os.environ.get("METAPRUNE_CACHE"))
        return data.loaders(self.batch_size, seed=int(meta.get("model_seed", 0)),
                            train_subset=meta.get("train_subset"))

    def task(self, model_id: str) -> _Task:
        """The cached task of a model (graph, regulariser, batches), built on first use."""
        if model_id not in self._tasks:
            model, example_inputs = self.model(model_id)
            # eval mode: batch norm uses (rewritten) running statistics, so a step's loss is
            # the loss of the network that will be pruned, not of a batch-statistics variant
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            graph = to_graph(model, example_inputs)
            regularizer = GroupSparsity(graph)
            with torch.no_grad():
                norms = regularizer.group_norms(graph.data.x, graph.data.edge_attr)
                scale = float(norms.sum())
                sparse_scale = float(regularizer.sparse_learning_penalty(norms))
            batches = _endless(self.loaders(model_id)[0])
            self._tasks[model_id] = _Task(model, example_inputs, graph, regularizer,
                                          max(scale, 1e-12), batches, max(sparse_scale, 1e-12))
        return self._tasks[model_id]


def dropped_fraction(speedup: float) -> float:
    """Share of each layer's channel groups a uniform prune to `speedup` removes.

    MACs scale with kept-in x kept-out channels, so a uniform keep ratio is ``speedup ** -0.5``.
    """
    return 1.0 - float(speedup) ** -0.5


def meta_loss(metanet, tasks: CorpusTasks, model_id: str, speedup: float, lam: float,
              prune_weight: float = 0.0, *, sparse_weight: float = 0.0,
              distill_weight: float = 0.0, prune_allocation: str = "uniform"):
    """One batch's meta-training loss; returns (loss, task_loss, reg, pruned_loss).

    ``loss = task_loss + lam * reg + prune_weight * pruned_loss + sparse_weight * sparse
    + distill_weight * distill``, differentiable:
    - ``task_loss``: cross-entropy of the rewritten model;
    - ``reg``: the group lasso of the rewritten weights divided by its value on the original
      weights (1.0 means "as sparse as before"), so `lam` weighs it alike on every model;
    - ``pruned_loss``: cross-entropy of the rewritten model with each layer's weakest groups
      (by the rewritten weights' group norms, `dropped_fraction(speedup)` of them) zeroed, as
      if pruned. It teaches the metanetwork to move what the network computes into the
      channels that pruning keeps, and (through `GroupSparsity.keep_gates`' straight-through
      gradient) to give the norms that make L2 keep the right channels. Skipped (zero) when
      `prune_weight` is 0. `prune_allocation` ``"global"`` drops the groups the engine's
      global allocation would (what `prune(method="metanet")` uses without a trained head).
    - ``sparse``: torch-pruning's sparse-learning penalty on the rewritten group norms
      (`GroupSparsity.sparse_learning_penalty`), divided by its value on the original weights;
    - ``distill``: KL divergence of the rewritten model's predictions from the original
      model's on the batch — the dense-accuracy guard: the rewrite alone must not change what
      the network predicts.
    """
    task = tasks.task(model_id)
    inputs, labels = task.next_batch()
    new_x, new_edge_attr, _ = metanet(task.graph, speedup)
    params = parameters_from_features(task.graph, new_x, new_edge_attr)
    logits = torch.func.functional_call(task.model, params, (inputs,))
    task_loss = F.cross_entropy(logits, labels)
    norms = task.regularizer.group_norms(new_x, new_edge_attr)
    reg = norms.sum() / task.reg_scale
    pruned_loss = torch.zeros((), dtype=task_loss.dtype)
    if prune_weight:
        keep = task.regularizer.keep_gates(norms, dropped_fraction(speedup),
                                           allocation=prune_allocation)
        pruned_x, pruned_edge_attr = task.regularizer.drop_groups(new_x, new_edge_attr, keep)
        pruned_params = parameters_from_features(task.graph, pruned_x, pruned_edge_attr)
        pruned_logits = torch.func.functional_call(task.model, pruned_params, (inputs,))
        pruned_loss = F.cross_entropy(pruned_logits, labels)
    loss = task_loss + lam * reg + prune_weight * pruned_loss
    if sparse_weight:
        sparse = task.regularizer.sparse_learning_penalty(norms) / task.sparse_scale
        loss = loss + sparse_weight * sparse
    if distill_weight:
        with torch.no_grad():
            reference = F.log_softmax(task.model(inputs), dim=-1)
        distill = F.kl_div(F.log_softmax(logits, dim=-1), reference, log_target=True,
                           reduction="batchmean")
        loss = loss + distill_weight * distill
    return loss, task_loss, reg, pruned_loss
