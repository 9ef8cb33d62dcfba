"""Per-layer sparsity policy search with Ray Tune (`metaprune tune`).

A trial draws one keep ratio per prunable channel group (the policy keys the pruning engine
accepts, named by each group's root module), prunes the model with l2 to the speed-up target
(the engine rescales the policy until the MACs meet the target within 2 %), fine-tunes it for a
few epochs and reports its test accuracy after every epoch. With ``objectives=("acc", "flops")``
the trial's speed-up target is searched too, and accuracy and MACs are both objectives; the
Pareto front (:mod:`.tune_pareto`) is computed from all trials. ASHA stops weak trials early on
the per-epoch accuracy; Optuna's TPE (multi-objective with two objectives) proposes policies.

Everything is written to one folder: ``recipe.json`` (the most accurate policy meeting the
target, which ``metaprune prune --policy recipe.json --speedup S ...`` applies again),
``trials.json`` and ``trials.csv`` (every trial), ``trials.png`` (accuracy against MACs, the
front highlighted) and Ray Tune's own results under ``ray/``.

Each trial holds one CPU and one torch thread, on a private Ray bound to 127.0.0.1 unless
``ray_address`` names a cluster to join. The model travels to the trials as the bytes of its
file(s), so a remote cluster needs no shared folder.

Example::

    from metaprune.training.tune import TuneSettings, run_search

    settings = TuneSettings(model="cnn1d.safetensors", dataset="mnist1d", speedup=2.0,
                            samples=16, scheduler="asha", finetune_epochs=3, out_dir="tune-out")
    summary = run_search(settings)
    summary["best"]["policy"]     # {'features.0.unit.conv': 0.83, 'features.1.unit.conv': 0.41}
    summary["recipe"]             # 'tune-out/recipe.json'
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from metaprune.data import load_dataset
from metaprune.data.adapt import adapt_loaders
from metaprune.errors import InvalidTargetError
from metaprune.finetune import evaluate, train
from metaprune.formats import load_model
from metaprune.measure import count_macs
from metaprune.metanet.policy import group_policy
from metaprune.pruning import prune_request
from metaprune.pruning.training_bridge import DATA_BATCH_SIZE
from metaprune.vocabulary import (
    TOLERANCE,
    PruneRequest,
    Recipe,
    check_latency_batch,
    check_speedup,
)

from .corpus import print_line, start_ray
from .tune_pareto import pareto_front, plot_trials

import ray  # loopback-only: metaprune.training set Ray's switch when it loaded
from ray import tune
from ray.tune.search.optuna import OptunaSearch

SEARCHES = ("random", "optuna")
# A trial prunes to MACs, or to a latency measured on the machine it runs on (trials take turns
# timing: the measurement lock in the cache folder serialises them across processes).
TARGET_KINDS = ("speedup", "latency_speedup")
LATENCY_WINDOW_LOW = 0.95  # a measured latency speed-up at or above 0.95 x meets its target
SCHEDULERS = ("asha",)
# Objective names on the command line -> the metric a trial reports.
OBJECTIVE_METRICS = {"acc": "accuracy", "accuracy": "accuracy", "flops": "macs", "macs": "macs"}
# Keep ratios a trial may draw per group. The engine rescales them (keep ** theta) to the target,
# so only their relative sizes matter; 1.0 would exempt a group from pruning altogether.
KEEP_RATIO_RANGE = (0.1, 1.0)
# With two objectives the speed-up target is drawn log-uniformly in [X ** 0.5, X ** 1.5]: as far
# below the requested X as above it, on the scale speed-ups compose on.
SPEEDUP_SPREAD_EXPONENTS = (0.5, 1.5)
# Drawn targets are rounded so a recipe's --speedup is short to type and applies exactly.
SPEEDUP_DECIMALS = 2
# `metaprune prune --dataset NAME` builds its loaders with seed 0 (and fine-tunes with the
# FinetuneConfig seed 0): the trials do the same, so a recipe reproduces its trial's accuracy.
DATA_SEED = 0
PRUNE_METHOD = "l2"  # `metaprune prune`'s default criterion, so the recipe needs no --method
RECIPE_FILE = "recipe.json"
TRIALS_JSON, TRIALS_CSV, TRIALS_PNG = "trials.json", "trials.csv", "trials.png"


@dataclass
class TuneSettings:
    """One policy search; JSON-serialisable.

    Example::

        TuneSettings(model="m.safetensors", dataset="mnist1d", speedup=2.0, samples=16,
                     search="optuna", objectives=("acc", "flops"))
    """

    model: str  # INPUT: a .pt2, or a .safetensors with its .json spec beside it
    dataset: str  # dataset id the trials fine-tune and evaluate on
    speedup: float  # the speed-up every trial must reach: MACs (within 2 %) or, with
    # target_kind "latency_speedup", latency measured at latency_batch (within [0.95, 1.1] x)
    samples: int = 16  # trials in all
    scheduler: str | None = None  # None (every trial runs every epoch) or "asha"
    search: str = "random"  # "random" or "optuna"
    objectives: tuple = ("acc",)  # ("acc",) or ("acc", "flops"): accuracy, or accuracy and MACs
    finetune_epochs: int = 1  # fine-tuning epochs per trial, reported one by one
    seed: int = 0  # seed of the search (random draws, Optuna's sampler); trials use DATA_SEED
    workers: int = 2  # CPUs of the local Ray (one trial per CPU); unused with ray_address
    ray_address: str | None = None  # join this cluster instead of starting a local one
    out_dir: str = "tune-out"  # recipe, trials, figure and Ray's results go here
    cache: str | None = field(default=None, repr=False)  # $METAPRUNE_CACHE for the trials
    target_kind: str = "speedup"  # "speedup" (MACs) or "latency_speedup" (measured latency)
    latency_batch: int = 1  # batch of the latency measurements of a latency target

    def __post_init__(self) -> None:
        self.objectives = tuple(self.objectives)
        self.speedup = check_speedup(self.speedup)
        if self.target_kind not in TARGET_KINDS:
            raise InvalidTargetError(f"target_kind must be one of {', '.join(TARGET_KINDS)}, "
                                     f"got {self.target_kind!r}")
        self.latency_batch = check_latency_batch(self.latency_batch)
        if self.samples < 1:
            raise InvalidTargetError(f"samples must be at least 1, got {self.samples}")
        if self.finetune_epochs < 0:
            raise InvalidTargetError(f"finetune epochs must be >= 0, got {self.finetune_epochs}")
        if self.workers < 1:
            raise InvalidTargetError(f"workers must be at least 1, got {self.workers}")
        if self.search not in SEARCHES:
            raise InvalidTargetError(f"search must be one of {', '.join(SEARCHES)}, "
                                     f"got {self.search!r}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise InvalidTargetError(f"scheduler must be one of {', '.join(SCHEDULERS)}, "
                                     f"got {self.scheduler!r}")
        metrics = [OBJECTIVE_METRICS.get(name) for name in self.objectives]
        if metrics not in (["accuracy"], ["accuracy", "macs"]):
            raise InvalidTargetError(
                f"objectives must be 'acc' or 'acc,flops', got {','.join(self.objectives)!r}")
        if self.multi_objective and self.scheduler == "asha":
            # ASHA ranks trials on one metric: on accuracy alone it would stop the fast,
            # less accurate trials the Pareto front is made of.
            raise InvalidTargetError("--scheduler asha needs a single objective (--objectives acc)")

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) == 2

    def to_dict(self) -> dict:
        return asdict(self)


def prunable_groups(model, example_inputs) -> list[str]:
    """Root module names of the channel groups the engine may prune: the search's dimensions.

    Example::

        prunable_groups(cnn1d, (x,))   # ['features.0.unit.conv', 'features.1.unit.conv']
    """
    # group_policy names every prunable group (and only those) by its root; the ratios given
    # here are irrelevant, only the keys are used. Listed in the model's own layer order.
    position = {name: index for index, (name, _) in enumerate(model.named_modules())}
    return sorted(group_policy(model, example_inputs, {}), key=position.__getitem__)


def search_space(groups: list[str], settings: TuneSettings) -> dict:
    """Tune's parameter space: ``keep`` (group root -> ratio), plus ``speedup`` with two
    objectives.

    Example::

        search_space(["conv1", "conv2"], TuneSettings(model="m.pt2", dataset="mnist1d",
                                                      speedup=2.0))
        # {'keep': {'conv1': Float(0.1, 1.0), 'conv2': Float(0.1, 1.0)}}
    """
    space = {"keep": {name: tune.uniform(*KEEP_RATIO_RANGE) for name in groups}}
    if settings.multi_objective:
        low, high = (settings.speedup ** exponent for exponent in SPEEDUP_SPREAD_EXPONENTS)
        space["speedup"] = tune.loguniform(low, high)
    return space


def trial_target(config: dict, settings_speedup: float) -> float:
    """The speed-up a trial prunes to: its drawn one (rounded), else the requested one."""
    if "speedup" not in config:
        return float(settings_speedup)
    return round(float(config["speedup"]), SPEEDUP_DECIMALS)


def run_trial(model, example_inputs, loaders, policy: dict[str, float], speedup: float, *,
              finetune_epochs: int, report: Callable[[dict], None] | None = None,
              target_kind: str = "speedup", latency_batch: int = 1) -> dict:
    """Prune `model` with `policy` to `speedup`, fine-tune, and return the last metrics.

    The same as ``prune(model, example_inputs, policy=policy, speedup=speedup, data=loaders,
    finetune_epochs=E)`` — same pruning, same loader order and fine-tune seed, so the same
    accuracy — except that fine-tuning runs here with a report after every epoch (what ASHA
    needs). Passing the data to `prune` with 0 epochs instead would recalibrate BatchNorm first
    and so advance the train loader's shuffle, shifting every later batch away from what
    ``metaprune prune`` sees.

    Returns (and passes to `report` once per epoch, or once with 0 epochs): ``accuracy``,
    ``macs``, ``params``, ``speedup`` (achieved: MACs, or measured latency with
    ``target_kind="latency_speedup"``), ``target_speedup``, ``epoch``, ``train_loss`` (None
    with 0 epochs), ``seconds`` (since the trial began).

    Example::

        metrics = run_trial(model, (x,), (train_loader, test_loader),
                            {"features.0.unit.conv": 0.5}, 2.0, finetune_epochs=1)
        metrics["accuracy"], metrics["speedup"]         # (0.71, 2.01)
    """
    started = time.perf_counter()
    train_loader, test_loader = loaders
    # latency is not a MACs trial's objective: skipping its measurement saves every trial that
    # time; a latency target measures it anyway (that is how the target is met)
    latency = target_kind == "latency_speedup"
    request = PruneRequest(method=PRUNE_METHOD, policy=policy, latency=latency,
                           latency_batch=latency_batch, **{target_kind: speedup})
    result = prune_request(model, example_inputs, request)
    pruned = result.model
    achieved = result.report["latency_speedup"] if latency else result.report["speedup"]
    figures = {"macs": result.report["macs_after"], "params": result.report["params_after"],
               "speedup": achieved, "target_speedup": speedup}
    reported = []

    def on_epoch(history_entry: dict) -> None:
        metrics = {"accuracy": history_entry["test_accuracy"], "epoch": history_entry["epoch"],
                   "train_loss": history_entry["train_loss"], **figures,
                   "seconds": time.perf_counter() - started}
        reported.append(metrics)
        if report is not None:
            report(metrics)

    # Defaults and no teacher, exactly as the engine fine-tunes without a `finetune` dict.
    train(pruned, train_loader, epochs=finetune_epochs, eval_loader=test_loader,
          progress=False, on_epoch=on_epoch)
    if finetune_epochs == 0:
        on_epoch({"test_accuracy": evaluate(pruned, test_loader), "epoch": 0,
                  "train_loss": None})
    return reported[-1]


def trial_loaders(dataset: str, example_inputs):
    """``((train, test), note)``: the dataset's loaders as `metaprune prune --dataset` builds
    them, samples fitted to the model's input by size-1 dimensions (`note` says how, or None).

    Example::

        (train, test), note = trial_loaders("mnist1d", (torch.randn(1, 40),))
        note   # "samples [1, 40] reshaped to the model's [40] (size-1 dimensions removed)"
    """
    loaders = load_dataset(dataset).loaders(DATA_BATCH_SIZE, seed=DATA_SEED)
    return adapt_loaders(loaders, example_inputs)


def _model_files(path: Path) -> dict[str, bytes]:
    """The file(s) `load_model` reads for `path`: the model, and a .safetensors' spec."""
    files = {path.name: path.read_bytes()}
    if path.suffix.lower() == ".safetensors":
        spec = path.with_suffix(".json")
        if spec.is_file():
            files[spec.name] = spec.read_bytes()
    return files


def _load_shipped_model(model_files: dict[str, bytes], model_name: str):
    with tempfile.TemporaryDirectory(prefix="metaprune-tune-") as folder:
        for name, payload in model_files.items():
            (Path(folder) / name).write_bytes(payload)
        return load_model(Path(folder) / model_name)


def _trainable(config: dict, *, model_files: dict[str, bytes], model_name: str,
               options: dict) -> None:
    """The Ray Tune function trainable: one trial, one CPU, one torch thread."""
    torch.set_num_threads(1)  # trials share the cores, one per trial
    if options["cache"]:
        os.environ["METAPRUNE_CACHE"] = options["cache"]
    model, example_inputs = _load_shipped_model(model_files, model_name)
    loaders, _ = trial_loaders(options["dataset"], example_inputs)
    target = trial_target(config, options["speedup"])
    try:
        run_trial(model, example_inputs, loaders, dict(config["keep"]), target,
                  finetune_epochs=options["finetune_epochs"], report=tune.report,
                  target_kind=options["target_kind"], latency_batch=options["latency_batch"])
    except InvalidTargetError as error:
        # Narrow layers can make a target unreachable within 2 % for some policies. That is a
        # finding about the policy, not a crash: one report, NaN objectives (Optuna records
        # the trial as failed, see _OptunaSkippingInfeasible; the front and the best skip it),
        # no traceback on the console.
        tune.report({"accuracy": math.nan, "macs": math.nan, "epoch": 0,
                     "target_speedup": target, "infeasible": str(error)})


class _TrialLines(tune.Callback):
    """One line per finished trial instead of Tune's periodic tables."""

    def __init__(self, samples: int, epochs: int, log: Callable[[str], None]) -> None:
        self.samples = samples  # trials in all, for the [n/N] counter
        self.epochs = epochs  # fine-tune epochs a complete trial reports
        self.log = log  # where lines go
        self.finished = 0

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.finished += 1
        result = trial.last_result or {}
        if "accuracy" not in result:
            self.log(f"[{self.finished}/{self.samples}] {trial.trial_id}: no result")
            return
        if result.get("infeasible"):
            self.log(f"[{self.finished}/{self.samples}] {trial.trial_id}: infeasible: "
                     f"{result['infeasible']}")
            return
        stopped = "" if result["epoch"] >= self.epochs else \
            f", stopped by the scheduler after epoch {result['epoch']}"
        self.log(f"[{self.finished}/{self.samples}] {trial.trial_id}: accuracy "
                 f"{result['accuracy']:.4f}, {result['speedup']:.2f}x (target "
                 f"{result['target_speedup']:g}x), {result['macs']:,} MACs, "
                 f"{result['seconds']:.1f} s{stopped}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.finished += 1
        self.log(f"[{self.finished}/{self.samples}] {trial.trial_id}: FAILED "
                 f"(see {TRIALS_JSON})")


class _OptunaSkippingInfeasible(OptunaSearch):
    """OptunaSearch that tells Optuna an infeasible trial failed.

    Told as is, its NaN objectives are refused by Optuna (a warning on the console) and the
    trial would stay "running" in the study.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if result and result.get("infeasible"):
            result, error = None, True
        super().on_trial_complete(trial_id, result, error)


def _search_algorithm(settings: TuneSettings):
    if settings.search == "optuna":
        if settings.multi_objective:
            # Optuna's TPE, multi-objective with two metrics. Not NSGA-II: its first generation
            # (50 by default) is drawn at random, so a search of a few dozen trials would be
            # random search; and Tune pickles the searcher, which NSGAIISampler (holding a
            # lock) refuses.
            return _OptunaSkippingInfeasible(metric=["accuracy", "macs"], mode=["max", "min"],
                                             seed=settings.seed)
        return _OptunaSkippingInfeasible(seed=settings.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=settings.seed)


def _scheduler(settings: TuneSettings):
    if settings.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # One rung per epoch: halve the field after every epoch from the first on.
    return ASHAScheduler(time_attr="training_iteration", max_t=max(settings.finetune_epochs, 1),
                         grace_period=1, reduction_factor=2)


def _error_line(error) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1][:300] if lines else type(error).__name__


def _trial_record(result, settings: TuneSettings, groups: list[str]) -> dict:
    """One trial of Tune's ResultGrid as a JSON-serialisable record (policy in group order)."""
    metrics = result.metrics or {}
    config = result.config or {}
    history = []
    if result.metrics_dataframe is not None and "accuracy" in result.metrics_dataframe:
        history = [float(a) for a in result.metrics_dataframe["accuracy"]]
    epochs_done = int(metrics.get("epoch", 0)) if "accuracy" in metrics else None
    if result.error is not None:
        status = "error"
    elif metrics.get("infeasible"):
        status = "infeasible"
    elif epochs_done is None:
        status = "no result"
    elif epochs_done < settings.finetune_epochs:
        status = "stopped early"
    else:
        status = "complete"
    achieved = metrics.get("speedup")
    return {
        "trial": metrics.get("trial_id") or Path(result.path).name,
        "status": status,
        "target_speedup": trial_target(config, settings.speedup),
        "policy": {name: float(config["keep"][name]) for name in groups
                   if name in config.get("keep", {})},
        "accuracy": None if status == "infeasible" else metrics.get("accuracy"),
        "accuracy_per_epoch": [] if status == "infeasible" else history,
        "epochs": epochs_done,
        "macs": None if status == "infeasible" else metrics.get("macs"),
        "params": metrics.get("params"),
        "speedup": achieved,
        "meets_target": achieved is not None and achieved >= settings.speedup * (
            LATENCY_WINDOW_LOW if settings.target_kind == "latency_speedup" else 1 - TOLERANCE),
        "seconds": metrics.get("seconds"),
        "error": _error_line(result.error) if result.error is not None
        else metrics.get("infeasible"),
    }


def best_trial(trials: list[dict]) -> int | None:
    """Index of the most accurate complete trial meeting the target (fewer MACs on ties).

    Example::

        best_trial([{"status": "complete", "meets_target": True, "accuracy": 0.8, "macs": 9},
                    {"status": "complete", "meets_target": False, "accuracy": 0.9, "macs": 5}])
        # 0
    """
    eligible = [i for i, t in enumerate(trials)
                if t["status"] == "complete" and t["meets_target"]]
    if not eligible:
        return None
    return max(eligible, key=lambda i: (trials[i]["accuracy"], -trials[i]["macs"], -i))


def recipe_document(trial: dict, settings: TuneSettings) -> dict:
    """The recipe of a trial: its policy plus what ``metaprune prune`` needs to apply it again.

    ``load_policy`` reads the ``policy`` entry; the rest says how it was found and applied.

    Example::

        recipe_document(best, settings)["policy"]   # {'features.0.unit.conv': 0.83, ...}
    """
    model = Path(settings.model)
    latency = settings.target_kind == "latency_speedup"
    return Recipe(
        policy=trial["policy"],
        speedup=None if latency else trial["target_speedup"],
        method=PRUNE_METHOD,
        dataset=settings.dataset,
        finetune_epochs=settings.finetune_epochs,
        model=str(model),
        tuned={**{key: trial[key] for key in ("trial", "accuracy", "macs", "params", "speedup")},
               **({"latency_speedup_target": trial["target_speedup"],
                   "latency_batch": settings.latency_batch} if latency else {})},
        command=apply_command(settings, trial["target_speedup"],
                              model.with_name(model.stem + "-tuned" + model.suffix),
                              Path(settings.out_dir) / RECIPE_FILE),
    ).to_dict()


def apply_command(settings: TuneSettings, speedup: float, out: Path, recipe: Path) -> str:
    """The ``metaprune prune`` command line that applies a recipe to the tuned model."""
    target = f"--speedup {speedup:g}" if settings.target_kind == "speedup" else \
        f"--latency-speedup {speedup:g} --latency-batch {settings.latency_batch}"
    return (f"metaprune prune {settings.model} --out {out} --policy {recipe} "
            f"{target} --dataset {settings.dataset} "
            f"--finetune-epochs {settings.finetune_epochs}")


def _write_csv(trials: list[dict], front: list[int], path: Path) -> None:
    groups = sorted({name for trial in trials for name in trial["policy"]})
    columns = ["trial", "status", "target_speedup", "speedup", "macs", "params", "accuracy",
               "epochs", "meets_target", "on_front", "seconds", "error"]
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(columns + [f"keep:{name}" for name in groups])
        on_front = set(front)
        for index, trial in enumerate(trials):
            row = {**trial, "on_front": index in on_front}
            writer.writerow([row[c] for c in columns] + [trial["policy"].get(n) for n in groups])


def run_search(settings: TuneSettings, *, log: Callable[[str], None] | None = None) -> dict:
    """Run the search and write its files; returns a summary.

    Returns:
        ``{"trials": [...], "front": [trial indices], "best": trial or None,
        "recipe": path or None, "files": {...}, "seconds", "macs_before", "accuracy_before",
        "groups": [...]}``. A trial record holds ``trial``, ``status`` (complete, stopped
        early, infeasible: the target was out of reach for its policy, error),
        ``target_speedup``, ``policy``, ``accuracy``, ``accuracy_per_epoch``, ``epochs``,
        ``macs``, ``params``, ``speedup``, ``meets_target``, ``seconds``, ``error``.
    """
    log = log or print_line
    started = time.perf_counter()
    model_path = Path(settings.model)
    if not model_path.is_file():
        raise InvalidTargetError(f"input model {settings.model!r} does not exist")
    out_dir = Path(settings.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    settings.cache = settings.cache or os.environ.get("METAPRUNE_CACHE")
    model, example_inputs = load_model(model_path)
    groups = prunable_groups(model, example_inputs)
    if not groups:
        raise InvalidTargetError("the model has no prunable channel group to search over")
    # Loaded here first: a missing dataset or samples that do not fit the model fail now, with
    # their hint, not in every trial.
    (_, test_loader), adaptation = trial_loaders(settings.dataset, example_inputs)
    if adaptation:
        log(f"input: {adaptation}")
    macs_before = count_macs(model, example_inputs)
    accuracy_before = evaluate(model, test_loader)
    log(f"tune {model_path.name} on {settings.dataset}: {len(groups)} groups, "
        f"{macs_before:,} MACs, accuracy {accuracy_before:.4f}; {settings.samples} trials, "
        f"{settings.search} search{', ASHA' if settings.scheduler else ''}, objectives "
        f"{','.join(settings.objectives)}, speed-up {settings.speedup:g}x, "
        f"{settings.finetune_epochs} fine-tune epoch(s) per trial")
    result_grid = _fit(settings, model_path, search_space(groups, settings), out_dir, log)
    trials = [_trial_record(result, settings, groups) for result in result_grid]
    complete = [t if t["status"] == "complete" else {} for t in trials]
    front = pareto_front(complete)
    best = best_trial(trials)
    files = {"trials_json": out_dir / TRIALS_JSON, "trials_csv": out_dir / TRIALS_CSV}
    files["figure"] = plot_trials(
        trials, front, out_dir / TRIALS_PNG, best=best,
        target_macs=macs_before / settings.speedup,
        title=f"{model_path.name} on {settings.dataset}: {len(trials)} trials, "
              f"target {settings.speedup:g}x")
    recipe = None
    if best is not None:
        recipe = out_dir / RECIPE_FILE
        recipe.write_text(json.dumps(recipe_document(trials[best], settings), indent=2) + "\n")
        files["recipe"] = recipe
    summary = {
        "settings": settings.to_dict(), "groups": groups, "macs_before": macs_before,
        "input_adaptation": adaptation, "accuracy_before": accuracy_before, "trials": trials, "front": front,
        "best": None if best is None else trials[best], "best_index": best,
        "recipe": None if recipe is None else str(recipe),
        "files": {key: str(path) for key, path in files.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    files["trials_json"].write_text(json.dumps(summary, indent=2) + "\n")
    _write_csv(trials, front, files["trials_csv"])
    return summary


def _fit(settings: TuneSettings, model_path: Path, space: dict, out_dir: Path, log):
    """Tune's ResultGrid of the whole search, on a private loopback Ray unless one is joined."""
    metric_settings = {} if settings.multi_objective else {"metric": "accuracy", "mode": "max"}
    trainable = tune.with_resources(
        tune.with_parameters(
            _trainable, model_files=_model_files(model_path), model_name=model_path.name,
            options={"dataset": settings.dataset, "speedup": settings.speedup,
                     "finetune_epochs": settings.finetune_epochs, "cache": settings.cache,
                     "target_kind": settings.target_kind,
                     "latency_batch": settings.latency_batch}),
        {"cpu": 1})
    started_here = not ray.is_initialized()
    if started_here:
        start_ray(settings.workers, settings.ray_address)
    try:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(num_samples=settings.samples,
                                        search_alg=_search_algorithm(settings),
                                        scheduler=_scheduler(settings),
                                        # one worker process per CPU for the whole search:
                                        # no per-trial start-up (importing torch takes seconds)
                                        reuse_actors=True, **metric_settings),
            run_config=tune.RunConfig(
                storage_path=str(out_dir / "ray"), verbose=0,
                callbacks=[_TrialLines(settings.samples, settings.finetune_epochs, log)],
                # a failing trial (e.g. a target its policy cannot meet) is recorded, not fatal
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
        )
        return tuner.fit()
    finally:
        if started_here:
            ray.shutdown()


def format_summary(summary: dict) -> list[str]:
    """The lines `metaprune tune` prints at the end: best policy, recipe, Pareto front."""
    trials, best = summary["trials"], summary["best"]
    counts = {}
    for trial in trials:
        counts[trial["status"]] = counts.get(trial["status"], 0) + 1
    lines = [f"{len(trials)} trials in {summary['seconds']} s: "
             + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))]
    if best is None:
        lines.append(f"no complete trial met the {summary['settings']['speedup']:g}x target: "
                     "no recipe written")
    else:
        lines.append(f"best policy: trial {best['trial']}, accuracy {best['accuracy']:.4f} "
                     f"(dense {summary['accuracy_before']:.4f}), {best['speedup']:.3f}x, "
                     f"{best['macs']:,} MACs")
        width = max(len(name) for name in best["policy"])
        lines += [f"  {name:<{width}}  keep {ratio:.3f}" for name, ratio in best["policy"].items()]
        recipe = json.loads(Path(summary["recipe"]).read_text())
        lines.append(f"recipe {summary['recipe']}; apply it with:")
        lines.append(f"  {recipe['command']}")
    lines.append(f"Pareto front (max accuracy, min MACs), {len(summary['front'])} of "
                 f"{len(trials)} trials:")
    for index in summary["front"]:
        trial = trials[index]
        lines.append(f"  {trial['macs']:>12,} MACs  {trial['speedup']:6.3f}x  accuracy "
                     f"{trial['accuracy']:.4f}  trial {trial['trial']}")
    lines.append("wrote " + ", ".join(summary["files"].values()))
    return lines
