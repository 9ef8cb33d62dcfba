"""Train the metanetwork's sparsity head on tuned policies (`metaprune metanet train-head`).

Only ``sparsity_head`` learns; every other parameter is frozen, so the weight rewrite of the
checkpoint is bit-identical afterwards. The head sees what the pruning engine shows it
(`metaprune.pruning.metanet_bridge.apply_metanet`): the graph of the metanet-TRANSFORMED model,
conditioned on the label's speed-up. Targets are the label policies (`policy_labels`): each
channel group's keep ratio given to every layer owning that group's output channels (the engine
averages those layers' answers back into the group, `group_policy`), as graph layer indices via
`policy_targets`.

The loss, per label:

- shape: the engine rescales whatever the head says to the exact target as ``keep ** theta``
  (`policy_allocation`), so only log-keep ratios UP TO A COMMON FACTOR matter. Both sides are
  normalised as ``u = log(keep) / mean(log(keep))`` over the label's layers (a uniform policy
  is all ones) and compared by mean squared error; theta cancels exactly.
- anchor (self-supervised, weight `anchor_weight`): the mean log keep ratio of the prediction
  is pulled to the uniform prior ``log(speedup ** -0.5)``, which fixes the one degree of
  freedom the shape loss leaves free, so the head's raw answer stays near the target before any
  rescaling.
- consistency (self-supervised, weight `consistency_weight`): at a speed-up drawn
  log-uniformly from `free_speedups` (mostly without labels) the normalised allocation should
  match the one at the label's speed-up (held fixed), so the head interpolates and
  extrapolates smoothly instead of answering arbitrarily where no label was.

With ``heads=N`` (`merged_head`), N heads are trained independently (different initial weights
and label orders) and saved as one head N times as wide whose logit is the mean of theirs: the
average of N fits varies less with the draw than any one of them, at the cost of a head
N times as wide (still a few thousand weights, run once per layer).

The frozen part of the metanetwork runs once per model: its per-layer features (the sparsity
head's input) are cached, and only the head runs in the training loop, with the speed-up
column of the features swapped per step.

Example::

    from metaprune.training.head_train import HeadTrainSettings, train_head

    summary = train_head(HeadTrainSettings(
        metanet="/work/runs/exp-d/checkpoints/epoch-001.safetensors",
        labels="/work/runs/head/labels", corpus="/work/corpus",
        out="/work/runs/head/metanet-head.safetensors", epochs=300))
    summary["shape_loss_before"], summary["shape_loss_after"]   # (0.31, 0.08)
    load_metanet(summary["out"]).head_trained                   # True
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from metaprune.errors import InvalidTargetError
from metaprune.graph import to_graph
from metaprune.metanet import load_metanet, policy_targets, save_metanet
from metaprune.metanet.network import MetaNetwork, prior_keep_ratio, sparsity_head_mlp

from .metatrain_tasks import CorpusTasks
from .policy_labels import read_labels

# |mean log keep| below this makes the normalised allocation meaningless (a policy keeping
# nearly everything everywhere has no shape); such labels are skipped.
MIN_MEAN_LOG_KEEP = 1e-3


@dataclass
class HeadTrainSettings:
    """One sparsity-head training run; JSON-serialisable.

    Example::

        HeadTrainSettings(metanet="in.safetensors", labels="labels", corpus="/work/corpus",
                          out="out.safetensors", epochs=300)
    """

    metanet: str  # checkpoint whose head is trained (read only)
    labels: str  # folder of `policy_labels` files
    corpus: str  # the corpus folder the labelled models come from
    out: str  # the new checkpoint (.safetensors, + .json beside it)
    epochs: int = 300  # passes over every label
    lr: float = 3e-3  # Adam learning rate of the head
    top_k: int = 1  # target = mean normalised allocation of the k most accurate trials
    anchor_weight: float = 0.1  # weight of the mean-log-keep-to-prior term
    consistency_weight: float = 0.1  # weight of the cross-speed-up consistency term
    free_speedups: tuple = (1.5, 4.0)  # range the consistency term draws speed-ups from
    validate_on: int = 0  # labelled models kept out of training to measure generalisation
    seed: int = 0  # order of labels and drawn speed-ups
    # heads trained independently (head m > 0 re-drawn with torch seed m, trained with seed
    # `seed + m`) and merged into one head of `heads` times the width: the mean of their logits
    heads: int = 1

    def __post_init__(self) -> None:
        self.free_speedups = tuple(float(s) for s in self.free_speedups)
        if self.epochs < 1 or self.top_k < 1 or self.validate_on < 0 or self.heads < 1:
            raise InvalidTargetError("epochs, top_k and heads must be >= 1, validate_on >= 0")
        low, high = self.free_speedups
        if not 1.0 < low <= high:
            raise InvalidTargetError(f"free speed-ups must satisfy 1 < low <= high, "
                                     f"got {self.free_speedups}")


@dataclass
class HeadExample:
    """One label, ready for the head: cached features and the normalised target."""

    model: str  # corpus model id
    speedup: float  # the label's speed-up target
    features: torch.Tensor  # [layers, head inputs]: the head's input at any speed-up
    layers: torch.Tensor  # graph layer indices the label names
    target_shape: torch.Tensor  # normalised log keep of those layers (mean 1)


def head_features(metanet, graph) -> torch.Tensor:
    """The sparsity head's per-layer input for `graph`, from one frozen forward pass.

    Its last column is the log speed-up, replaced by `head_keep` for any target.
    """
    captured = []
    hook = metanet.sparsity_head.register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            metanet(graph, rewrite_edges=False)
    finally:
        hook.remove()
    return captured[0]


def head_keep(metanet, features: torch.Tensor, speedup: float) -> torch.Tensor:
    """Per-layer keep ratios of the head at `speedup`: `MetaNetwork`'s own head computation
    (prior logit + head output) on cached features, differentiable in the head only."""
    target = torch.full((features.shape[0],), float(speedup), dtype=features.dtype)
    return metanet.head_keep_ratios(features[:, :-1], target)


def normalised_log_keep(keep: torch.Tensor) -> torch.Tensor:
    """``log(keep) / mean(log(keep))``: the allocation with the engine's rescaling factored out.

    Example::

        normalised_log_keep(torch.tensor([0.5, 0.25]))   # tensor([0.667, 1.333])
        normalised_log_keep(torch.tensor([0.25, 0.0625]))  # the same: 0.5 ** 2, 0.25 ** 2
    """
    log_keep = keep.clamp_min(1e-6).log()
    return log_keep / log_keep.mean()


def layer_policy(module, example_inputs, policy: dict[str, float]) -> dict[str, float]:
    """Group policy -> graph-layer policy: every layer owning a group's output channels gets
    the group's ratio (the inverse of `group_policy`'s averaging)."""
    from metaprune.pruning.groups import build_dependency_graph, collect_groups, output_layers

    DG = build_dependency_graph(module, tuple(example_inputs))
    per_layer = {}
    for group in collect_groups(DG, output_layers(DG)):
        if group.root in policy:
            for use in group.uses:
                if use.side == "out":
                    per_layer[use.unit] = float(policy[group.root])
    return per_layer


def _target_shape(graph, module, example_inputs, label: dict, top_k: int):
    """(layer indices, mean normalised allocation of the label's top_k trials), or None."""
    ranked = sorted(label["trials"], key=lambda t: -t["accuracy"])[:top_k] \
        if top_k > 1 and label["trials"] else [{"policy": label["policy"]}]
    layers, shapes = None, []
    for trial in ranked:
        index, ratios = policy_targets(graph, layer_policy(module, example_inputs,
                                                          trial["policy"]))
        if layers is None:
            layers = index
        elif not torch.equal(layers, index):
            continue  # a trial naming other groups (never from one search): not comparable
        if index.numel() < 2 or ratios.log().mean().abs() < MIN_MEAN_LOG_KEEP:
            continue
        shapes.append(normalised_log_keep(ratios))
    if not shapes:
        return None
    return layers, torch.stack(shapes).mean(0)


def build_examples(loaded, labels: Sequence[dict], tasks: CorpusTasks,
                   top_k: int = 1) -> list[HeadExample]:
    """Every usable label as a `HeadExample`; the frozen metanetwork runs once per model."""
    examples, per_model = [], {}
    for label in labels:
        model_id = label["model"]
        if model_id not in per_model:
            model, example_inputs = tasks.model(model_id)
            # what the engine does: transform first, then ask the head about the result
            transformed = loaded.transform(model, example_inputs)
            graph = to_graph(transformed, example_inputs)
            per_model[model_id] = (transformed, example_inputs, graph,
                                   head_features(loaded.metanet, graph))
        transformed, example_inputs, graph, features = per_model[model_id]
        target = _target_shape(graph, transformed, example_inputs, label, top_k)
        if target is not None:
            examples.append(HeadExample(model_id, float(label["speedup"]), features, *target))
    return examples


def example_loss(metanet, example: HeadExample, settings: HeadTrainSettings,
                 rng: random.Random | None = None):
    """(total, shape) loss of one example; the consistency term needs `rng` (training only)."""
    keep = head_keep(metanet, example.features, example.speedup)[example.layers]
    shape = normalised_log_keep(keep)
    shape_loss = (shape - example.target_shape).square().mean()
    prior = math.log(float(prior_keep_ratio(torch.tensor(example.speedup))))
    loss = shape_loss + settings.anchor_weight * (keep.log().mean() - prior).square()
    if rng is not None and settings.consistency_weight:
        low, high = (math.log(s) for s in settings.free_speedups)
        free = math.exp(rng.uniform(low, high))
        other = normalised_log_keep(head_keep(metanet, example.features, free)[example.layers])
        loss = loss + settings.consistency_weight * (other - shape.detach()).square().mean()
    return loss, shape_loss


def mean_shape_loss(metanet, examples: Sequence[HeadExample],
                    settings: HeadTrainSettings) -> float | None:
    """Mean shape loss over `examples` (None for none), without gradients."""
    if not examples:
        return None
    with torch.no_grad():
        return sum(float(example_loss(metanet, e, settings)[1]) for e in examples) / len(examples)


def uniform_shape_loss(examples: Sequence[HeadExample]) -> float | None:
    """The shape loss of a uniform allocation (every normalised ratio 1): the baseline."""
    if not examples:
        return None
    return sum(float((e.target_shape - 1).square().mean()) for e in examples) / len(examples)


def fit_head(metanet, train_set: Sequence[HeadExample], settings: HeadTrainSettings,
             seed: int, log: Callable[[str], None]) -> None:
    """Trains `metanet`'s sparsity head in place on `train_set` (everything else frozen): Adam,
    one full-batch step per epoch; `seed` orders the labels and draws the free speed-ups."""
    for name, parameter in metanet.named_parameters():
        parameter.requires_grad_(name.startswith("sparsity_head."))
    optimizer = torch.optim.Adam(metanet.sparsity_head.parameters(), lr=settings.lr)
    rng = random.Random(seed)
    for epoch in range(1, settings.epochs + 1):
        order = list(train_set)
        rng.shuffle(order)
        optimizer.zero_grad()
        # one step per epoch on the mean loss: a few dozen labels make a small, exact batch
        total = sum(example_loss(metanet, e, settings, rng)[0] for e in order) / len(order)
        total.backward()
        optimizer.step()
        if epoch == 1 or epoch % max(settings.epochs // 5, 1) == 0:
            log(f"epoch {epoch}/{settings.epochs}: loss {total.item():.4f}, shape loss "
                f"{mean_shape_loss(metanet, train_set, settings):.4f}")
    for parameter in metanet.parameters():
        parameter.requires_grad_(True)


def merged_head(heads: Sequence[nn.Sequential]) -> nn.Sequential:
    """One ``Linear-SiLU-Linear`` head whose logit is exactly the mean of `heads`' logits:
    their hidden units side by side, the output layer's weights and bias divided by their count.

    Example::

        merged = merged_head([a, b])     # a, b: sparsity_head_mlp(67, 32)
        torch.allclose(merged(x), (a(x) + b(x)) / 2, atol=1e-6)   # True; merged is 67 -> 64 -> 1
    """
    count = len(heads)
    first = nn.Linear(heads[0][0].in_features, sum(head[0].out_features for head in heads))
    last = nn.Linear(first.out_features, 1)
    with torch.no_grad():
        first.weight.copy_(torch.cat([head[0].weight for head in heads]))
        first.bias.copy_(torch.cat([head[0].bias for head in heads]))
        last.weight.copy_(torch.cat([head[-1].weight for head in heads], dim=1) / count)
        last.bias.copy_(sum(head[-1].bias for head in heads) / count)
    return nn.Sequential(first, nn.SiLU(), last)


def with_head(metanet: MetaNetwork, head: nn.Sequential) -> MetaNetwork:
    """A copy of `metanet` with `head` as its sparsity head (its config's ``head_hidden`` the
    head's width), every other weight the same."""
    config = dict(metanet.config, head_hidden=head[0].out_features)
    widened = MetaNetwork(**config)
    state = {name: value for name, value in metanet.state_dict().items()
             if not name.startswith("sparsity_head.")}
    state.update({f"sparsity_head.{name}": value for name, value in head.state_dict().items()})
    widened.load_state_dict(state)
    return widened.eval()


def train_head(settings: HeadTrainSettings, *, log: Callable[[str], None] | None = None) -> dict:
    """Train the head, save the checkpoint, and return a JSON-serialisable summary.

    Returns ``{"out", "labels", "examples", "train_models", "validation_models",
    "shape_loss_before", "shape_loss_after", "validation_loss_before", "validation_loss_after",
    "uniform_loss", "validation_uniform_loss", "seconds", "settings"}``; the same goes into the
    checkpoint's training metadata (``head_training``) with ``sparsity_head_trained: true``.
    """
    log = log or print
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    loaded = load_metanet(settings.metanet)
    metanet = loaded.metanet
    labels = read_labels(settings.labels)
    tasks = CorpusTasks(settings.corpus)
    missing = sorted({label["model"] for label in labels} - set(tasks.meta))
    if missing:
        raise InvalidTargetError(f"labelled models not in the corpus {settings.corpus}: "
                                 f"{', '.join(missing[:5])}")
    models = sorted({label["model"] for label in labels})
    validation_models = set(random.Random(settings.seed).sample(models, settings.validate_on)) \
        if settings.validate_on and settings.validate_on < len(models) else set()
    examples = build_examples(loaded, labels, tasks, settings.top_k)
    train_set = [e for e in examples if e.model not in validation_models]
    validation_set = [e for e in examples if e.model in validation_models]
    if not train_set:
        raise InvalidTargetError(f"no usable label in {settings.labels} to train on")
    before = mean_shape_loss(metanet, train_set, settings)
    validation_before = mean_shape_loss(metanet, validation_set, settings)
    if settings.heads == 1:
        fit_head(metanet, train_set, settings, settings.seed, log)
    else:
        members = []
        for member in range(settings.heads):
            trained = copy.deepcopy(metanet)
            if member:  # the first keeps the checkpoint's own initial head
                torch.manual_seed(member)
                trained.sparsity_head = sparsity_head_mlp(metanet.sparsity_head[0].in_features,
                                                          metanet.sparsity_head[0].out_features)
            log(f"head {member + 1}/{settings.heads}")
            fit_head(trained, train_set, settings, settings.seed + member, log)
            members.append(trained.sparsity_head)
        metanet = with_head(metanet, merged_head(members))
    summary = {
        "out": str(settings.out), "labels": str(settings.labels),
        "label_files": len(labels), "examples": len(examples),
        "train_models": len(models) - len(validation_models),
        "validation_models": sorted(validation_models),
        "shape_loss_before": before,
        "shape_loss_after": mean_shape_loss(metanet, train_set, settings),
        "uniform_loss": uniform_shape_loss(train_set),
        "validation_loss_before": validation_before,
        "validation_loss_after": mean_shape_loss(metanet, validation_set, settings),
        "validation_uniform_loss": uniform_shape_loss(validation_set),
        "label_search_seconds": round(sum(label["search_seconds"] for label in labels), 1),
        "settings": asdict(settings),
    }
    summary["seconds"] = round(time.perf_counter() - started, 1)
    training = dict(loaded.training_metadata)
    training.update(sparsity_head_trained=True, head_training=summary)
    save_metanet(metanet, settings.out, training=training,
                 scope=loaded.document.get("scope"))  # the head does not change what it serves
    return summary


def head_only_checkpoint(source, out) -> dict:
    """Writes `source` with its weight rewrite switched off: the sparsity head alone remains.

    The last layers of the node, edge and gate decoders (`MetaNetwork.rewrite_layers`) are
    zeroed, so every delta is exactly 0 and every channel gate exactly exp(0) = 1: `transform`
    returns the model bit for bit, while the message passing and the trained head still
    allocate. This is what ships when no trained rewrite beats the null metanetwork on the
    validation split (see the README).
    Returns the new checkpoint's training record.
    """
    from metaprune.metanet import read_metanet

    metanet, document = read_metanet(source)
    with torch.no_grad():
        for last in metanet.rewrite_layers():
            last.weight.zero_()
            last.bias.zero_()
    training = dict(document.get("training", {}))
    training["rewrite"] = "off: node, edge and gate decoders' last layers zeroed (identity)"
    save_metanet(metanet, out, training=training, scope=document.get("scope"))
    return training
