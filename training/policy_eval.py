"""Which per-layer allocation prunes best, and what does deciding it cost?
(`metaprune metanet compare-policies`)

On held-out corpus models, at each speed-up and fine-tune seed, five ways to decide how many
channels each layer keeps, every one pruned with the l2 criterion to the exact target and
fine-tuned for the same number of epochs on the model's own data:

- ``uniform``: the same share of every group (``allocation="uniform"``);
- ``global``: the engine's normalised global l2 ranking (its default);
- ``tuned``: the best policy of a Ray Tune search (`metaprune.training.tune.run_search`) run on
  that model at that speed-up — found once per (model, speed-up), then pruned per seed;
- ``predicted``: the trained sparsity head's policy (one forward pass on the metanet-rewritten
  model, exactly what the engine asks it), applied to the ORIGINAL weights: the policy's effect
  alone;
- ``metanet``: ``method="metanet"`` with the trained-head checkpoint: rewrite + the head's
  policy (the fine-tune epochs split between after the rewrite and after pruning, same total).

Prune-time compute is the wall time of the allocation decision made before pruning: the whole
search for ``tuned``, the rewrite + head forward for ``predicted`` and ``metanet``, nothing
extra for ``uniform`` and ``global`` (their allocation runs inside the prune, as for all). The
one-off cost of the head (label searches + head training) is read from the checkpoint's
training metadata.

Example::

    from metaprune.training.policy_eval import PolicyComparison, compare_policies, policy_table

    comparison = PolicyComparison(corpus="/work/corpus", metanet="head.safetensors",
                                  model_ids=["mnist1d-cnn1d-004-s0", "mnist1d-mlp-004-s0"],
                                  speedups=(2.0, 3.0), seeds=(0, 1), finetune_epochs=2,
                                  samples=8, out_dir="/work/runs/head/compare")
    runs = compare_policies(comparison)
    for line in format_table(policy_table(runs)): print(line)
    # 2x  tuned      96.10 ± 0.31   search 41.2 s
    # 2x  predicted  95.90 ± 0.35   forward 0.21 s
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metaprune.metanet import load_metanet
from metaprune.pruning import prune

from .metanet_eval import mean_and_error, paired_difference, summarize_runs
from .metatrain_tasks import CorpusTasks
from .policy_labels import label_name

METHODS = ("uniform", "global", "tuned", "predicted", "metanet")
CRITERION = "l2"  # the one criterion every method prunes with
RUNS_FILE = "runs.jsonl"  # one finished prune per line: a re-run skips those


@dataclass
class PolicyComparison:
    """One comparison; JSON-serialisable.

    Example::

        PolicyComparison(corpus="/work/corpus", metanet="head.safetensors",
                         model_ids=["mnist1d-vit-004-s0"], out_dir="compare")
    """

    corpus: str  # the corpus folder
    metanet: str  # checkpoint with a trained sparsity head
    model_ids: list = field(default_factory=list)  # held-out models (empty: every held-out one)
    speedups: tuple = (2.0, 3.0)  # MACs speed-up targets
    seeds: tuple = (0, 1)  # fine-tune seeds
    finetune_epochs: int = 2  # every method's total fine-tune epochs
    samples: int = 8  # trials of each tuned search
    search_finetune_epochs: int = 1  # fine-tune epochs per search trial
    workers: int = 1  # CPUs of the search's local Ray
    out_dir: str = "compare-out"  # runs.jsonl, searches/, table.json
    torch_threads: int = 1  # this process's torch threads (the search's Ray worker takes a core)


def _decide_predicted(loaded, model, example_inputs, speedup: float) -> tuple[dict, float]:
    """The head's policy as the engine obtains it (rewrite, then ask the head), and its seconds."""
    started = time.perf_counter()
    transformed = loaded.transform(model, example_inputs)
    policy = dict(loaded.layer_keep_ratios(transformed, example_inputs, speedup=speedup))
    return policy, time.perf_counter() - started


def _decide_tuned(settings: PolicyComparison, tasks: CorpusTasks, model_id: str,
                  speedup: float, log) -> tuple[dict | None, float]:
    """The best policy of a search on `model_id` and the search's seconds (reused if done)."""
    from metaprune.training.tune import TRIALS_JSON, TuneSettings, run_search

    folder = Path(settings.out_dir) / "searches" / Path(label_name(model_id, speedup)).stem
    if (folder / TRIALS_JSON).is_file():
        summary = json.loads((folder / TRIALS_JSON).read_text())
    else:
        meta = tasks.meta[model_id]
        summary = run_search(TuneSettings(
            model=str(tasks.folder / meta["weights"]), dataset=meta["dataset"], speedup=speedup,
            samples=settings.samples, finetune_epochs=settings.search_finetune_epochs,
            workers=settings.workers, out_dir=str(folder)), log=lambda line: None)
        log(f"{model_id} {speedup:g}x: searched {len(summary['trials'])} policies in "
            f"{summary['seconds']:.1f} s")
    best = summary["best"]
    return (None if best is None else best["policy"]), float(summary["seconds"])


def _prune_arguments(method: str, policy: dict | None, loaded) -> dict:
    if method == "uniform":
        return {"method": CRITERION, "allocation": "uniform"}
    if method == "global":
        return {"method": CRITERION}
    if method == "metanet":
        return {"method": "metanet", "metanet": loaded, "criterion": CRITERION}
    return {"method": CRITERION, "policy": policy}


def compare_policies(settings: PolicyComparison, *,
                     log: Callable[[str], None] | None = None) -> list[dict]:
    """Every (model, speed-up, seed, method) prune + fine-tune; returns one dict per run.

    A run holds ``model``, ``speedup``, ``seed``, ``method``, ``accuracy``, ``achieved_speedup``,
    ``allocation`` (what the engine reports it used), ``decision_seconds`` (see the module
    docstring) and ``prune_seconds`` (the prune + fine-tune call). Finished runs are appended
    to ``runs.jsonl`` in `out_dir` and skipped when the comparison is run again.
    """
    import ray

    log = log or print
    # several busy threads on shared cores stall each other far more than one thread runs slow
    torch.set_num_threads(settings.torch_threads)
    tasks = CorpusTasks(settings.corpus)
    loaded = load_metanet(settings.metanet)
    if not loaded.head_trained:
        log(f"warning: {settings.metanet} has an untrained sparsity head: 'metanet' prunes "
            "with global allocation and 'predicted' is the uniform prior")
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_file = out_dir / RUNS_FILE
    runs = [json.loads(line) for line in runs_file.read_text().splitlines()] \
        if runs_file.is_file() else []
    done = {(r["model"], r["speedup"], r["seed"], r["method"]) for r in runs}
    model_ids = list(settings.model_ids) or tasks.held_out_ids
    started_ray = not ray.is_initialized()
    if started_ray:
        from metaprune.training.corpus import start_ray

        start_ray(settings.workers, None)  # one Ray for every search of the comparison
    try:
        for model_id in model_ids:
            model, example_inputs = tasks.model(model_id)
            for speedup in map(float, settings.speedups):
                if all((model_id, speedup, int(seed), method) in done
                       for seed in settings.seeds for method in METHODS):
                    continue
                tuned, search_seconds = _decide_tuned(settings, tasks, model_id, speedup, log)
                predicted, forward_seconds = _decide_predicted(loaded, model, example_inputs,
                                                               speedup)
                decisions = {"uniform": (None, 0.0), "global": (None, 0.0),
                             "tuned": (tuned, search_seconds),
                             "predicted": (predicted, forward_seconds)}
                for seed in map(int, settings.seeds):
                    for method in METHODS:
                        if (model_id, speedup, seed, method) in done:
                            continue
                        if method == "tuned" and tuned is None:
                            log(f"{model_id} {speedup:g}x: no tuned trial met the target")
                            continue
                        policy, decision = decisions.get(method, (None, None))
                        started = time.perf_counter()
                        # fresh loaders: a shared train loader's shuffle generator would give
                        # each method a batch order that depends on what ran before it
                        loaders = tasks.loaders(model_id)
                        report = prune(model, example_inputs, speedup=speedup, data=loaders,
                                       finetune_epochs=settings.finetune_epochs,
                                       finetune={"seed": seed},
                                       **_prune_arguments(method, policy, loaded)).report
                        if method == "metanet":
                            decision = report["seconds"].get("metanet", 0.0)
                        run = {"model": model_id, "speedup": speedup, "seed": seed,
                               "method": method, "accuracy": report["accuracy_after"],
                               "achieved_speedup": report["speedup"],
                               "allocation": report["allocation"],
                               "decision_seconds": round(decision, 4),
                               "prune_seconds": round(time.perf_counter() - started, 2)}
                        runs.append(run)
                        with runs_file.open("a") as stream:
                            stream.write(json.dumps(run) + "\n")
                        log(f"{model_id} {speedup:g}x seed {seed} {method:9s} accuracy "
                            f"{run['accuracy']:.4f} ({run['achieved_speedup']:.3f}x, decision "
                            f"{run['decision_seconds']:.2f} s)")
    finally:
        if started_ray:
            ray.shutdown()
    wanted = set(model_ids)
    return [r for r in runs if r["model"] in wanted
            and r["speedup"] in set(map(float, settings.speedups))
            and r["seed"] in set(map(int, settings.seeds))]


def policy_table(runs: Sequence[dict], reference: str = "tuned") -> list[dict]:
    """Per (speed-up, method): accuracy mean ± s.e. over models (seeds averaged per model, as
    `summarize_runs`), the mean prune-time decision seconds per (model, speed-up), and
    ``versus`` ± ``versus_error``: accuracy minus `reference`'s on the same model and seed,
    mean ± s.e. over the models both have (`paired_difference`; None without any). The paired difference is what tells methods
    apart: the spread between models (an MLP at 66 %, a CNN at 97 %) cancels in it."""
    rows = summarize_runs(runs)
    for row in rows:
        decisions = {}
        for run in runs:
            if run["speedup"] == row["speedup"] and run["method"] == row["method"]:
                decisions.setdefault(run["model"], []).append(run["decision_seconds"])
        row["decision_seconds"], row["decision_error"] = mean_and_error(
            [statistics.fmean(values) for values in decisions.values()])
        mean, error, paired = paired_difference(runs, row["speedup"], row["method"], reference)
        row["versus"], row["versus_error"] = (mean, error) if paired else (None, None)
    order = {method: index for index, method in enumerate(METHODS)}
    return sorted(rows, key=lambda r: (r["speedup"], order.get(r["method"], len(order))))


def compute_ratio(table: Sequence[dict], speedup: float, numerator: str = "tuned",
                  denominator: str = "predicted") -> float | None:
    """How many times more prune-time compute `numerator`'s decision took than `denominator`'s."""
    seconds = {row["method"]: row["decision_seconds"] for row in table
               if row["speedup"] == speedup}
    if not seconds.get(numerator) or not seconds.get(denominator):
        return None
    return seconds[numerator] / seconds[denominator]


def format_table(table: Sequence[dict], one_off: dict | None = None) -> list[str]:
    """The lines `compare-policies` prints: accuracy (%) mean ± s.e., its paired difference to
    the tuned policy, and decision seconds."""
    lines = ["speed-up  method     accuracy (%)    - tuned (points)   decision s   models  runs"]
    for row in table:
        versus = "" if row["versus"] is None else \
            f"{100 * row['versus']:+6.2f} ± {100 * row['versus_error']:4.2f}"
        lines.append(f"{row['speedup']:>6g}x  {row['method']:9s} {100 * row['mean']:6.2f} ± "
                     f"{100 * row['error']:4.2f}   {versus:>16s}   "
                     f"{row['decision_seconds']:9.3f}   {row['models']:>5}  {row['runs']:>4}")
    for speedup in sorted({row["speedup"] for row in table}):
        ratio = compute_ratio(table, speedup)
        if ratio is not None:
            lines.append(f"{speedup:g}x: the tuned search took {ratio:.0f}x the prune-time "
                         "compute of the predicted policy")
    if one_off:
        lines.append(f"one-off cost of the head: label searches {one_off['label_search_seconds']}"
                     f" s ({one_off['label_files']} labels), head training "
                     f"{one_off['seconds']} s")
    return lines
