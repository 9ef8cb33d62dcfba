"""The corpus of trained "data models" for meta-training, built by Ray tasks and resumable.

Each model of the plan (:mod:`.corpus_plan`: sampled family config, seed and recipe) is trained
by one Ray task holding one CPU and one torch thread, evaluated, optionally given the paper's
"initial pruning" (l2 to a small speed-up, one epoch of fine-tuning) so corpus models look like
what users send, and returned as bytes; the driver stores it (:mod:`.corpus_store`) and rewrites
the manifest. Finished models (their ``ID.meta.json`` exists) are skipped, so re-running the same
command after a crash only trains what is missing.

Example::

    from metaprune.training.corpus import build_corpus
    from metaprune.training.corpus_plan import plan_corpus

    tasks = plan_corpus(["mlp", "cnn1d", "resnet", "vit"], ["mnist1d"], count=20, epochs=5,
                        initial_prune=1.3)
    summary = build_corpus(tasks, "/work/corpus", workers=2)
    summary["trained"], summary["skipped"]       # (20, 0); a second call gives (0, 20)

    from metaprune.formats import load_model
    model, example_inputs = load_model("/work/corpus/mnist1d-cnn1d-000-s0.safetensors")
"""

import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from metaprune import zoo
from metaprune.data import load_dataset
from metaprune.errors import InvalidTargetError
from metaprune.finetune import evaluate, train
from metaprune.formats import save_model
from metaprune.measure import count_macs, count_params
from metaprune.pruning import prune
from metaprune.seeding import seed_everything

from .corpus_plan import CorpusTask
from .ray_connect import connect_ray
from .corpus_store import (
    ModelArtifact,
    finished_metadata,
    is_finished,
    read_meta,
    store_model,
    summarize,
    write_manifest,
)

import ray  # loopback-only: metaprune.training set Ray's switch when it loaded

# Fine-tuning after the initial pruning: one epoch, as in the paper's corpus preparation.
INITIAL_PRUNE_FINETUNE_EPOCHS = 1
# Scales of the requested speed-up's excess over 1 tried in turn (1.3 -> 1.3, 1.25, 1.35, ...).
INITIAL_PRUNE_TARGET_FACTORS = (1.0, 0.83, 1.17, 0.67, 1.33, 1.67, 0.5)
INITIAL_PRUNE_FIELDS = ("speedup", "flops_before", "flops_after", "params_before",
                        "params_after", "accuracy_before", "accuracy_after", "criterion")


@functools.lru_cache(maxsize=4)
def _dataset(name: str, cache: str | None):
    # A Ray worker process trains many models in turn: load each dataset once per process.
    # `cache` is part of the key so a changed $METAPRUNE_CACHE is honoured.
    return load_dataset(name)


def train_model(task: CorpusTask | dict, *, threads: int = 1) -> ModelArtifact:
    """Train, evaluate and (optionally) initially prune one corpus model; nothing is written.

    Args:
        task: a planned task (or its `to_dict()`, as Ray passes it).
        threads: torch intra-op threads; one per process is fastest for these small models
            when several processes share the cores.

    Returns:
        The model's files (``.safetensors`` weights and ``.json`` spec) as bytes, and its
        metadata: family, config (the stored model's widths), dataset, accuracy (of the stored
        model), macs, params, seeds, recipe, held_out, wall seconds, and the initial pruning's
        figures when it was pruned.
    """
    task = task if isinstance(task, CorpusTask) else CorpusTask(**task)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    data = _dataset(task.dataset, os.environ.get("METAPRUNE_CACHE"))
    recipe = task.recipe
    train_loader, test_loader = data.loaders(
        recipe["batch_size"], seed=task.model_seed, train_subset=task.train_subset)
    seed_everything(task.model_seed)  # the weight initialisation
    model = zoo.build(task.family, task.config)
    settings = {"optimizer": recipe["optimizer"], "lr": recipe["lr"],
                "schedule": recipe["schedule"], "seed": task.model_seed}
    history = train(model, train_loader, epochs=recipe["epochs"], config=settings, progress=False)
    trained_accuracy = evaluate(model, test_loader)
    example_inputs = data.example_inputs(batch=2)
    initial_pruning = None
    accuracy = trained_accuracy
    if task.initial_prune:
        pruned, initial_pruning = _initial_prune(
            model, example_inputs, task.initial_prune, (train_loader, test_loader),
            {"optimizer": recipe["optimizer"], "seed": task.model_seed})
        if pruned is not None:
            model = pruned
            accuracy = float(initial_pruning["accuracy_after"])
    model.eval()
    with tempfile.TemporaryDirectory(prefix="metaprune-corpus-") as folder:
        weights = Path(folder) / f"{task.model_id}.safetensors"
        save_model(model, example_inputs, weights, family=task.family)
        files = {suffix: weights.with_suffix(suffix).read_bytes()
                 for suffix in (".safetensors", ".json")}
    meta = {
        "model_id": task.model_id,
        "family": task.family,
        "config": zoo.config_of(task.family, model),
        "config_trained": task.config,
        "dataset": task.dataset,
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "index": task.index,
        "seed": task.seed,
        "model_seed": task.model_seed,
        "recipe": recipe,
        "train_subset": task.train_subset,
        "held_out": task.held_out,
        "unseen": task.unseen,
        "accuracy": accuracy,
        "accuracy_trained": trained_accuracy,
        "train_accuracy": history[-1]["train_accuracy"],
        "train_loss": history[-1]["train_loss"],
        "macs": count_macs(model, (example_inputs[0][:1],)),
        "params": count_params(model),
        "initial_pruning": initial_pruning,
        "weights": f"{task.model_id}.safetensors",
        "spec": f"{task.model_id}.json",
        "torch_threads": threads,
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    return ModelArtifact(files=files, meta=meta)


def _initial_prune(model, example_inputs, speedup: float, loaders, finetune: dict):
    """Prune ~`speedup` times with l2, fine-tune one epoch; returns (pruned or None, record).

    Narrow models cannot always reach a speed-up within the engine's 2 % tolerance (one channel
    more or less jumps past it), so nearby targets are tried in turn; "about 1.3x" is the point.
    When none is reachable the model stays unpruned and the record says why.
    """
    reasons = []
    for factor in INITIAL_PRUNE_TARGET_FACTORS:
        target = round(1.0 + (speedup - 1.0) * factor, 3)
        try:
            result = prune(model, example_inputs, method="l2", speedup=target, data=loaders,
                           finetune_epochs=INITIAL_PRUNE_FINETUNE_EPOCHS, finetune=finetune)
        except InvalidTargetError as error:
            reasons.append(str(error))
            continue
        record = {key: result.report[key] for key in INITIAL_PRUNE_FIELDS}
        record.update(target=target, finetune_epochs=INITIAL_PRUNE_FINETUNE_EPOCHS)
        return result.model, record
    return None, {"skipped": reasons[-1], "targets_tried": len(reasons)}


def build_model(task: CorpusTask, folder: str | os.PathLike) -> tuple[dict, bool]:
    """Train and store one model unless it is finished; returns (metadata, trained now).

    This is what a Ray task does, without Ray: useful in tests and for a single model.
    """
    folder = Path(folder)
    if is_finished(folder, task.model_id):
        return read_meta(folder, task.model_id), False
    artifact = train_model(task)
    store_model(folder, artifact)
    return artifact.meta, True


def _train_remote(task: dict, cache: str | None) -> ModelArtifact:
    """The Ray task body: same cache folder as the driver, one torch thread."""
    if cache:
        os.environ["METAPRUNE_CACHE"] = cache
    return train_model(task, threads=1)


def start_ray(workers: int, address: str | None) -> None:
    """Join `address` (token auth when a token is available, see `ray_connect`), or start a
    private local Ray with `workers` CPUs bound to 127.0.0.1."""
    if address:
        connect_ray(address)
    else:
        # address="local": always a new private cluster, never one a `ray start` left running.
        ray.init(address="local", num_cpus=workers, include_dashboard=False,
                 _node_ip_address="127.0.0.1", configure_logging=False)


def build_corpus(
    tasks: Sequence[CorpusTask],
    folder: str | os.PathLike,
    *,
    workers: int = 2,
    ray_address: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train every unfinished task with Ray and store it in `folder`; returns a summary.

    One Ray task per model (``num_cpus=1``, one torch thread). After each finished model the
    driver writes its files, its metadata, then the manifest (all atomically) and logs a line
    ``[n/N] ID accuracy A, S s``. A failing model is logged and counted, the others go on.

    Returns:
        ``{"planned", "skipped", "trained", "failed": [(id, message)], "seconds"}``.
    """
    log = log or print_line
    if workers < 1:
        raise InvalidTargetError(f"workers must be at least 1, got {workers}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    finished = finished_metadata(folder)
    pending = [task for task in tasks if task.model_id not in finished]
    skipped = len(tasks) - len(pending)
    log(f"corpus {folder}: {len(tasks)} planned, {skipped} already finished (skipped), "
        f"{len(pending)} to train")
    write_manifest(folder, finished)
    summary = {"planned": len(tasks), "skipped": skipped, "trained": 0, "failed": []}
    if pending:
        started_here = not ray.is_initialized()
        if started_here and not ray_address:
            _check_datasets_cached({task.dataset for task in pending})
        if started_here:
            start_ray(workers, ray_address)
        try:
            _run_tasks(pending, folder, finished, summary, log)
        finally:
            if started_here:
                ray.shutdown()
    summary["seconds"] = round(time.perf_counter() - started, 1)
    log(f"corpus {folder}: trained {summary['trained']}, skipped {skipped}, "
        f"failed {len(summary['failed'])}, {summary['seconds']} s; "
        f"{len(finished)} models in the manifest")
    for line in summarize(finished):
        log(line)
    return summary


def _check_datasets_cached(datasets: set[str]) -> None:
    """Load each dataset once here, so a missing cache fails before Ray, with its fetch hint.

    Only for a local cluster: a remote one has its own cache folder.
    """
    for dataset in sorted(datasets):
        _dataset(dataset, os.environ.get("METAPRUNE_CACHE"))
    _dataset.cache_clear()  # the driver trains nothing; let the workers hold the arrays


def _run_tasks(pending, folder: Path, finished: dict, summary: dict, log) -> None:
    remote = ray.remote(num_cpus=1)(_train_remote)
    cache = os.environ.get("METAPRUNE_CACHE")
    references = {remote.remote(task.to_dict(), cache): task for task in pending}
    done = 0
    while references:
        ready, _ = ray.wait(list(references), num_returns=1)
        task = references.pop(ready[0])
        done += 1
        try:
            artifact = ray.get(ready[0])
        except ray.exceptions.RayError as error:
            message = str(error).strip().splitlines()[-1][:300]
            summary["failed"].append((task.model_id, message))
            log(f"[{done}/{len(pending)}] {task.model_id} FAILED: {message}")
            continue
        store_model(folder, artifact)
        finished[task.model_id] = artifact.meta
        write_manifest(folder, finished)
        summary["trained"] += 1
        meta = artifact.meta
        log(f"[{done}/{len(pending)}] {task.model_id} accuracy {meta['accuracy']:.4f} "
            f"(trained {meta['accuracy_trained']:.4f}), {meta['wall_seconds']:.1f} s"
            f"{' held-out' if meta['held_out'] else ''}")


def print_line(line: str) -> None:
    """A progress line, flushed at once (pipelines log through this by default)."""
    print(line, file=sys.stdout, flush=True)
