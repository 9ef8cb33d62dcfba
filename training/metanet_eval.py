"""Does the metanetwork help? Evidence on held-out corpus models, and a method comparison.

Two questions, each answered on models the metanetwork never trained on:

- `transform_evidence`: how far the rewrite moves the weights, what it costs before any
  fine-tuning, and whether the result is easier to prune — accuracy right after a 2x L2 prune
  (no fine-tune, no BatchNorm recalibration) for the original and the rewritten weights, and
  the share of each layer's group-norm energy that such a prune throws away.
- `compare_methods`: at each speed-up, metanetwork + L2 against L2 alone and against other
  classic criteria, with the same total fine-tune epochs for every method (the metanetwork's
  split between after the rewrite and after pruning), over models x seeds, mean ± standard
  error.

Example::

    from metaprune.training.metanet_eval import compare_methods, transform_evidence

    rows = transform_evidence("metanet.safetensors", "/work/corpus", ["mnist1d-mlp-004-s0"])
    table = compare_methods("metanet.safetensors", "/work/corpus", ["mnist1d-mlp-004-s0"],
                            speedups=(2.0,), seeds=(0, 1), finetune_epochs=4)
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Sequence

import torch

from metaprune.bench.metanet_stats import mean_and_error
from metaprune.errors import MetaPruneError
from metaprune.graph import to_graph
from metaprune.metanet import GroupSparsity, load_metanet
from metaprune.pruning import prune
from metaprune.training.metatrain_tasks import CorpusTasks, dropped_fraction

NO_FINETUNE = {"bn_recalibration": False}  # "right after pruning": not even BN statistics move


def dropped_energy(graph, x: torch.Tensor, edge_attr: torch.Tensor, speedup: float) -> float:
    """Share of the squared group norms held by the groups a uniform `speedup` L2 prune drops.

    Lower means the weights a prune removes mattered less: the network is easier to prune.
    """
    regularizer = GroupSparsity(graph)
    norms = regularizer.group_norms(x, edge_attr)
    dropped = regularizer.weakest_groups(norms, dropped_fraction(speedup))
    energy = norms.square()
    return float(energy[dropped].sum() / energy.sum())


def _pruned_accuracy(model, example_inputs, loaders, speedup: float) -> float:
    result = prune(model, example_inputs, method="l2", speedup=speedup, data=loaders,
                   finetune_epochs=0, finetune=NO_FINETUNE)
    return float(result.report["accuracy_after"])


def transform_evidence(checkpoint, corpus, model_ids: Sequence[str], *,
                       speedup: float = 2.0) -> list[dict]:
    """Per held-out model: relative weight change, accuracies and dropped energy, before/after.

    Returns one dict per model with ``relative_change`` (||new - old|| / ||old|| over every
    graph feature that holds a parameter), ``accuracy`` / ``accuracy_rewritten`` (dense),
    ``pruned_accuracy`` / ``pruned_accuracy_rewritten`` (right after an L2 prune to
    `speedup`, no fine-tune), ``dropped_energy`` / ``dropped_energy_rewritten``.
    """
    from metaprune.finetune import evaluate

    loaded = load_metanet(checkpoint)
    tasks = CorpusTasks(corpus)
    rows = []
    for model_id in model_ids:
        model, example_inputs = tasks.model(model_id)
        loaders = tasks.loaders(model_id)
        graph = to_graph(model, example_inputs)
        with torch.no_grad():
            new_x, new_edge_attr, _ = loaded.metanet(graph)
        rewritten = graph.write_back(new_x, new_edge_attr)
        mask = graph.data.x_param_mask
        old = torch.cat([graph.data.x[:, :mask.shape[1]][mask], graph.data.edge_attr])
        new = torch.cat([new_x[:, :mask.shape[1]][mask], new_edge_attr])
        rows.append({
            "model": model_id,
            "relative_change": float((new - old).norm() / old.norm()),
            "accuracy": float(evaluate(model, loaders[1])),
            "accuracy_rewritten": float(evaluate(rewritten, loaders[1])),
            "pruned_accuracy": _pruned_accuracy(model, example_inputs, loaders, speedup),
            "pruned_accuracy_rewritten": _pruned_accuracy(rewritten, example_inputs, loaders,
                                                          speedup),
            "dropped_energy": dropped_energy(graph, graph.data.x, graph.data.edge_attr, speedup),
            "dropped_energy_rewritten": dropped_energy(graph, new_x, new_edge_attr, speedup),
        })
    return rows


def compare_methods(checkpoint, corpus, model_ids: Sequence[str], *,
                    speedups: Sequence[float] = (2.0, 3.0), seeds: Sequence[int] = (0, 1),
                    finetune_epochs: int = 4, criteria: Sequence[str] = ("l2", "bn_scale", "l1"),
                    log=None) -> list[dict]:
    """Accuracy after prune + fine-tune, per (speed-up, method, model, seed).

    Methods: ``metanet+l2`` (rewrite, ``finetune_epochs // 2`` epochs, L2 global prune, the
    rest) and each of `criteria` alone (prune, `finetune_epochs` epochs); every method gets
    the same total epochs and the same fine-tune seed. A method that cannot prune a model
    (e.g. ``bn_scale`` without norm layers) is logged and left out. Returns one dict per run with
    ``speedup``, ``method``, ``model``, ``seed``, ``accuracy``, ``achieved_speedup``,
    ``seconds``.
    """
    log = log or functools.partial(print, flush=True)  # a line per run, as it finishes
    tasks = CorpusTasks(corpus)
    loaded = load_metanet(checkpoint) if checkpoint is not None else None
    runs = []
    for model_id in model_ids:
        model, example_inputs = tasks.model(model_id)
        for speedup in speedups:
            for seed in seeds:
                settings = {"seed": int(seed)}
                methods = [(name, {"method": name}) for name in criteria]
                if loaded is not None:
                    methods.insert(0, ("metanet+l2", {"method": "metanet", "metanet": loaded,
                                                      "allocation": "global"}))
                for label, arguments in methods:
                    # fresh loaders per run: a shared loader's shuffle state would give each
                    # method a different batch order, depending on the order methods run in
                    loaders = tasks.loaders(model_id)
                    try:
                        report = prune(model, example_inputs, speedup=speedup, data=loaders,
                                       finetune_epochs=finetune_epochs, finetune=settings,
                                       **arguments).report
                    except MetaPruneError as error:  # e.g. bn_scale on a model without norms
                        log(f"{model_id} {speedup:g}x seed {seed} {label}: skipped ({error})")
                        continue
                    run = {"speedup": speedup, "method": label, "model": model_id,
                           "seed": int(seed), "accuracy": report["accuracy_after"],
                           "achieved_speedup": report["speedup"],
                           "seconds": round(sum(report["seconds"].values()), 2)}
                    runs.append(run)
                    log(f"{model_id} {speedup:g}x seed {seed} {label:11s} "
                        f"accuracy {run['accuracy']:.4f} ({run['seconds']:.1f} s)")
    return runs


def summarize_runs(runs: Sequence[dict]) -> list[dict]:
    """Per (speed-up, method): mean ± standard error of accuracy over models x seeds.

    The seeds of one model are averaged first, so the error is over models (the larger
    source of spread), and ``runs`` counts every prune.
    """
    table = {}
    for run in runs:
        key = (run["speedup"], run["method"])
        table.setdefault(key, {}).setdefault(run["model"], []).append(run["accuracy"])
    rows = []
    for (speedup, method), per_model in sorted(table.items()):
        mean, error = mean_and_error([statistics.fmean(v) for v in per_model.values()])
        rows.append({"speedup": speedup, "method": method, "mean": mean, "error": error,
                     "models": len(per_model),
                     "runs": sum(len(v) for v in per_model.values())})
    return rows


def paired_difference(runs: Sequence[dict], speedup: float, method: str,
                      baseline: str) -> tuple[float, float, int]:
    """Mean ± standard error over models of `method` minus `baseline` accuracy at `speedup`.

    Runs are paired by (model, seed), which removes the spread between models; seeds of one
    model are averaged first. Returns ``(mean, error, models)``, ``(0, 0, 0)`` with no pair.
    """
    accuracy = {(run["method"], run["model"], run["seed"]): run["accuracy"]
                for run in runs if run["speedup"] == speedup}
    per_model = {}
    for (name, model, seed), value in accuracy.items():
        if name == method and (baseline, model, seed) in accuracy:
            per_model.setdefault(model, []).append(value - accuracy[(baseline, model, seed)])
    if not per_model:
        return 0.0, 0.0, 0
    mean, error = mean_and_error([statistics.fmean(values) for values in per_model.values()])
    return mean, error, len(per_model)
