"""Meta-training of the metanetwork on a corpus of trained models, data-parallel with Ray Train.

One step: draw a corpus model and a batch of its dataset, rewrite the model's weights with the
metanetwork (`parameters_from_features`), and minimise the task loss of the rewritten model
(`torch.func.functional_call`) plus ``lam`` times the DepGraph group-lasso of the rewritten
weights, divided by its value on the original weights so ``lam`` means the same for a model
of 2k and one of 200k parameters, plus ``prune_weight`` times the task loss of the rewritten
model with each layer's weakest channel groups zeroed (what pruning to the step's speed-up
would remove; see `meta_loss`). AdamW on the metanetwork.

Each Ray Train worker takes its own shard of the training models; gradients are averaged with
an all-reduce (gloo, loopback only) after every step, so every worker holds the same
metanetwork. Worker 0 writes ``OUT_DIR/metrics.jsonl`` and one checkpoint per epoch (``OUT_DIR/checkpoints/``);
a new run in the same folder resumes from the latest one. At the end every saved checkpoint is
validated by a prune-and-fine-tune on held-out corpus models (`validate_checkpoint`) and the
best is copied to the requested path.

Example::

    from metaprune.training.metatrain import MetaTrainConfig, train_with_ray, select_best

    config = MetaTrainConfig(corpus="/work/corpus", out_dir="runs/a", epochs=2,
                             steps_per_epoch=50)
    train_with_ray(config, workers=2)            # or train_locally(config) without Ray
    best = select_best(config, "metanet.safetensors")
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from metaprune.errors import InvalidTargetError
from metaprune.metanet import MetaNetwork, read_metanet, save_metanet
from metaprune.training.metatrain_tasks import CorpusTasks, meta_loss

CHECKPOINT_FOLDER = "checkpoints"
METRICS_FILE = "metrics.jsonl"
VALIDATION_FILE = "validation.jsonl"


@dataclass
class MetaTrainConfig:
    """Everything a meta-training run needs; JSON-serialisable (Ray passes it to workers).

    Example::

        MetaTrainConfig(corpus="/work/corpus", out_dir="runs/a", epochs=3, lam=0.1)
    """

    corpus: str  # corpus folder (ID.safetensors + ID.json + ID.meta.json)
    out_dir: str  # metrics, checkpoints and validation results go here
    epochs: int = 2  # total epochs; a resumed run continues up to this number
    steps_per_epoch: int = 40  # per worker; equal on every worker so all-reduces pair up
    batch_size: int = 64  # dataset samples per step
    lr: float = 1e-3  # AdamW learning rate of the metanetwork
    weight_decay: float = 1e-4  # AdamW weight decay
    lam: float = 0.1  # weight of the normalised group-sparsity term
    prune_weight: float = 1.0  # weight of the loss with each layer's weakest groups zeroed
    sparse_weight: float = 0.0  # weight of torch-pruning's sparse-learning penalty (normalised)
    distill_weight: float = 0.0  # weight of the KL to the original model (dense guard)
    prune_allocation: str = "uniform"  # which groups the pruned loss drops: uniform or global
    speedups: tuple = (1.5, 2.0, 3.0)  # speed-up targets the metanetwork is conditioned on
    hidden: int = 32  # MetaNetwork width (new runs only; a resumed run keeps its own)
    num_layers: int = 3  # MetaNetwork message-passing rounds
    residual_scale: float = 1e-3  # MetaNetwork's delta multiplier (small: near-identity start)
    gate_range: float = 3.0  # MetaNetwork's channel gates shrink by up to exp(-3) (0: none)
    seed: int = 0  # model/batch sampling and metanetwork initialisation
    max_models: int | None = None  # use at most this many training models (None: all)
    families: list = field(default_factory=list)  # only these families ([]: all)
    datasets: list = field(default_factory=list)  # only these datasets ([]: all)
    cache: str | None = None  # $METAPRUNE_CACHE for the workers (None: theirs)
    # corpus folder of validation models (a split of its own): checkpoints are selected by
    # `metanet_select.validation_score` on them; None: the older held-out-models protocol
    validation: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def checkpoint_paths(out_dir: str | os.PathLike) -> list[Path]:
    """Saved epoch checkpoints of a run, oldest first."""
    return sorted((Path(out_dir) / CHECKPOINT_FOLDER).glob("epoch-*.safetensors"))


def _optimizer_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.stem + ".optimizer.pt")


def _start_state(config: MetaTrainConfig) -> tuple[MetaNetwork, torch.optim.Optimizer, int, int]:
    """A fresh metanetwork and optimiser, or both restored from the latest checkpoint."""
    saved = checkpoint_paths(config.out_dir)
    if saved:
        metanet, document = read_metanet(saved[-1])
        training = document.get("training", {})
        epoch, step = int(training.get("epoch", 0)), int(training.get("step", 0))
    else:
        torch.manual_seed(config.seed)
        metanet = MetaNetwork(hidden=config.hidden, num_layers=config.num_layers,
                              residual_scale=config.residual_scale,
                              gate_range=config.gate_range)
        epoch = step = 0
    metanet.train()
    optimizer = torch.optim.AdamW(metanet.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    if saved and _optimizer_path(saved[-1]).exists():
        optimizer.load_state_dict(torch.load(_optimizer_path(saved[-1]), weights_only=True))
    return metanet, optimizer, epoch, step


def _average_gradients(metanet: MetaNetwork, world_size: int) -> None:
    """All-reduce gradients (a missing one counts as zero: the sparsity head gets none)."""
    if world_size == 1:
        return
    import torch.distributed as dist

    for parameter in metanet.parameters():
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
        parameter.grad /= world_size


def training_scope(tasks: CorpusTasks, config: MetaTrainConfig) -> dict:
    """What a checkpoint trained on `tasks` serves: the families and datasets of its training
    models; universal when the run was not restricted to some families."""
    metas = [tasks.meta[model_id] for model_id in tasks.train_ids]
    return {"families": sorted({meta["family"] for meta in metas}),
            "datasets": sorted({meta["dataset"] for meta in metas}),
            "universal": not config.families}


def _append_json(path: Path, record: dict) -> None:
    with path.open("a") as stream:
        stream.write(json.dumps(record) + "\n")


def run_training(config: MetaTrainConfig, *, rank: int = 0, world_size: int = 1,
                 report=None) -> Path | None:
    """The training loop of one worker (all of it when `world_size` is 1).

    Args:
        config: the run.
        rank, world_size: this worker's place; it trains on training models ``rank::world_size``.
        report: called as ``report(metrics, checkpoint_path)`` after each epoch on every worker
            (Ray Train needs all workers to report), checkpoint_path None except on rank 0.

    Returns:
        The last checkpoint written (rank 0), else None.
    """
    torch.set_num_threads(1)  # one thread per worker: the workers share the cores
    out_dir = Path(config.out_dir)
    tasks = CorpusTasks(config.corpus, families=config.families, datasets=config.datasets,
                        max_models=config.max_models, batch_size=config.batch_size)
    shard = tasks.train_ids[rank::world_size]
    if not shard:
        raise InvalidTargetError(
            f"worker {rank} of {world_size} got no training model: the corpus "
            f"{config.corpus} has {len(tasks.train_ids)} (use fewer workers)")
    metanet, optimizer, start_epoch, step = _start_state(config)
    rng = random.Random(config.seed * 1000 + rank * 100 + start_epoch)
    last = None
    for epoch in range(start_epoch, config.epochs):
        for _ in range(config.steps_per_epoch):
            started = time.perf_counter()
            model_id = rng.choice(shard)
            speedup = rng.choice(config.speedups)
            loss, task_loss, reg, pruned_loss = meta_loss(
                metanet, tasks, model_id, speedup, config.lam, config.prune_weight,
                sparse_weight=config.sparse_weight, distill_weight=config.distill_weight,
                prune_allocation=config.prune_allocation)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _average_gradients(metanet, world_size)
            optimizer.step()
            step += 1
            if rank == 0:
                _append_json(out_dir / METRICS_FILE, {
                    "step": step, "epoch": epoch + 1, "model": model_id, "speedup": speedup,
                    "loss": loss.item(), "task_loss": task_loss.item(), "reg": reg.item(),
                    "pruned_loss": pruned_loss.item(),
                    "seconds": round(time.perf_counter() - started, 4),
                    "workers": world_size})
        checkpoint = None
        if rank == 0:
            checkpoint = out_dir / CHECKPOINT_FOLDER / f"epoch-{epoch + 1:03d}.safetensors"
            save_metanet(metanet, checkpoint, training={
                "epoch": epoch + 1, "step": step, "corpus": str(config.corpus),
                "workers": world_size, "config": config.to_dict(),
                "models": sorted(tasks.train_ids)}, scope=training_scope(tasks, config))
            torch.save(optimizer.state_dict(), _optimizer_path(checkpoint))
            last = checkpoint
        if report is not None:
            report({"epoch": epoch + 1, "step": step, "loss": loss.item()}, checkpoint)
    return last


def train_locally(config: MetaTrainConfig) -> Path | None:
    """`run_training` in this process, without Ray."""
    Path(config.out_dir).mkdir(parents=True, exist_ok=True)
    return run_training(config)


def _join_process_group(store_path: str, rank: int, world_size: int) -> None:
    """A gloo process group over a file store and the loopback interface.

    Not Ray's torch backend: its TCPStore listens on every interface, and nothing of a
    meta-training run should be reachable from outside the machine. A `FileStore` listens
    nowhere, and ``GLOO_SOCKET_IFNAME=lo`` keeps gloo's pair sockets on 127.0.0.1.
    (A multi-machine cluster would need a shared folder and another interface.)
    """
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)


def _ray_worker_loop(loop_config: dict) -> None:
    """The Ray Train worker body: rank and world size from the train context."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    config = MetaTrainConfig(**loop_config["config"])
    if config.cache:
        os.environ["METAPRUNE_CACHE"] = config.cache
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if world_size > 1:
        _join_process_group(loop_config["store"], rank, world_size)

    def report(metrics: dict, checkpoint_path: Path | None) -> None:
        if checkpoint_path is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="metatrain-ckpt-") as folder:
            for source in (checkpoint_path, checkpoint_path.with_suffix(".json")):
                shutil.copy2(source, Path(folder) / source.name)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))

    try:
        run_training(config, rank=rank, world_size=world_size, report=report)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def train_with_ray(config: MetaTrainConfig, *, workers: int = 2,
                   ray_address: str | None = None):
    """Run `run_training` on `workers` Ray Train workers (one CPU, one torch thread each).

    Starts a private Ray bound to 127.0.0.1 unless `ray_address` (or a running Ray) is given.
    The workers average gradients through a gloo process group of their own (see
    `_join_process_group`), so Ray's `DataParallelTrainer` is used without its torch backend.
    Returns Ray Train's `Result`.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from metaprune.training.corpus import start_ray

    if workers < 1:
        raise InvalidTargetError(f"workers must be at least 1, got {workers}")
    out_dir = Path(config.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    config = MetaTrainConfig(**{**config.to_dict(), "out_dir": str(out_dir),
                                "corpus": str(Path(config.corpus).resolve()),
                                "cache": config.cache or os.environ.get("METAPRUNE_CACHE")})
    # a fresh rendezvous file per run: a FileStore must not find a previous run's keys
    store = out_dir / f"process-group-{uuid.uuid4().hex}.store"
    started_here = not ray.is_initialized()
    if started_here:
        start_ray(workers, ray_address)
    try:
        trainer = DataParallelTrainer(
            _ray_worker_loop,
            train_loop_config={"config": config.to_dict(), "store": str(store)},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False,
                                         resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=str(out_dir / "ray_results"), name="metatrain"),
        )
        return trainer.fit()
    finally:
        store.unlink(missing_ok=True)
        if started_here:
            ray.shutdown()


def validate_checkpoint(checkpoint: str | os.PathLike, config: MetaTrainConfig, *,
                        model_ids: list[str] | None = None, speedup: float = 2.0,
                        finetune_epochs: int = 1) -> dict:
    """Prune-and-fine-tune score of one checkpoint on held-out corpus models.

    Each model is rewritten by the metanetwork, pruned `speedup` times with l2, fine-tuned
    `finetune_epochs` epochs and evaluated; the score is the mean test accuracy.
    """
    from metaprune.metanet import load_metanet
    from metaprune.pruning import prune

    tasks = CorpusTasks(config.corpus, families=config.families, datasets=config.datasets,
                        batch_size=config.batch_size)
    ids = model_ids if model_ids is not None else tasks.held_out_ids[:2]
    if not ids:
        raise InvalidTargetError(f"the corpus {config.corpus} has no held-out model to validate on")
    loaded = load_metanet(checkpoint)
    accuracies = {}
    for model_id in ids:
        model, example_inputs = tasks.model(model_id)
        rewritten = loaded.transform(model, example_inputs)
        loaders = tasks.loaders(model_id)
        result = prune(rewritten, example_inputs, method="l2", speedup=speedup, data=loaders,
                       finetune_epochs=finetune_epochs,
                       finetune={"seed": config.seed})
        accuracies[model_id] = float(result.report["accuracy_after"])
    return {"checkpoint": str(checkpoint), "accuracies": accuracies,
            "score": sum(accuracies.values()) / len(accuracies)}


def select_best(config: MetaTrainConfig, out: str | os.PathLike, *,
                model_ids: list[str] | None = None) -> dict:
    """Validate every saved checkpoint (once; results are kept in ``validation.jsonl``) and
    copy the best (highest mean accuracy, the later on ties) to `out` with its JSON config."""
    results_path = Path(config.out_dir) / VALIDATION_FILE
    known = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            record = json.loads(line)
            known[record["checkpoint"]] = record
    checkpoints = checkpoint_paths(config.out_dir)
    if not checkpoints:
        raise InvalidTargetError(f"no checkpoint in {config.out_dir}/{CHECKPOINT_FOLDER}")
    results = []
    null_cells = None
    for checkpoint in checkpoints:
        record = known.get(str(checkpoint))
        if record is None:
            if config.validation:
                from metaprune.training.metanet_select import validation_score

                record = validation_score(checkpoint, config.validation, null_cells=null_cells)
                null_cells = record["null_cells"]
            else:
                record = validate_checkpoint(checkpoint, config, model_ids=model_ids)
            _append_json(results_path, record)
        results.append(record)
    # a checkpoint whose rewrite alone breaks a validation model is never chosen over one
    # that does not (the guard; records of the older protocol have no guard and all pass)
    eligible = [r for r in results if r.get("passes_guard", True)] or results
    best = max(eligible, key=lambda record: (record["score"], record["checkpoint"]))
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InvalidTargetError(f"--out must end in .safetensors, got {str(out)!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    source = Path(best["checkpoint"])
    shutil.copy2(source, out)
    shutil.copy2(source.with_suffix(".json"), out.with_suffix(".json"))
    return {"best": best, "validated": results, "out": str(out)}

