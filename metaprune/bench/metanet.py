"""Does the metanetwork beat its own fallback? Every method at equal budget on held-out models.

Models: every model of `--held-out` (a corpus folder built with its own corpus seed, none of
whose models meta-training or checkpoint selection ever saw; every model there must be marked
``held_out``). Rows: the metanetwork (`prune(method="metanet")`), the null metanetwork (exact
identity, same budget split, the same per-model choice among the non-learned candidates: what
the measurement gives without the head), every classic criterion with global and uniform allocation, and
DepGraph-style sparse learning (see `metaprune.bench.metanet_rows`). Speed-ups 2x, 3x, 4x;
budgets 0 (BatchNorm recalibration only), 1 and 4 fine-tune epochs, i.e. equal optimiser steps
for every row; several seeds, fresh data loaders for every run. Figures: mean ± standard error
over models, paired differences per family and overall, the rewrite-alone guard (dense accuracy
of each held-out model before and after the rewrite, BatchNorm statistics as the rewrite leaves
them). Writes `benchmarks/metanet.md` and `benchmarks/metanet.png`.

Every finished run is appended to `--runs` (JSON lines) and skipped when the command is run
again, so a long run resumes; classic rows do not depend on the checkpoint and are reused when
only the checkpoint changes. `--quick` runs a subset: 2 models per family, the goals' speed-ups
3x and 4x (2x left out), criteria l1, l2 and taylor (bn_scale was never the best classic row of
the full run), 3 seeds, budgets 0, 1 and 4: on the 3 MNIST-1D families (6 models, 972 runs) it
took 17 min wall (1,027 s) on 2 cores shared with three other jobs (load about 5), under
``nice -n 15``. `--also CKPT` adds a second checkpoint as row ``metanet@NAME`` (e.g. the
previously shipped one).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from pathlib import Path

QUICK_MODELS_PER_FAMILY = 2
QUICK_CRITERIA = "l1,l2,taylor"
# the goals' speed-ups (small budget at 3x and 4x, equal budget at 3x); 2x is left out
QUICK_SPEEDUPS = "3,4"


def add_arguments(parser) -> None:
    parser.add_argument("--held-out", metavar="DIR[,DIR]",
                        help="corpus folder(s) of held-out models (default: "
                             "$METAPRUNE_CACHE/corpus/held-out)")
    parser.add_argument("--metanet", default="default",
                        help="checkpoint for the metanet row ('default': what prune() picks)")
    parser.add_argument("--also", metavar="CKPT",
                        help="a second checkpoint (e.g. the previous one) as row metanet@NAME")
    parser.add_argument("--speedups", default="2,3,4")
    parser.add_argument("--budgets", default="0,1,4", help="fine-tune epochs (equal steps)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--criteria", default="l1,l2,bn_scale,taylor,hessian,lamp,fpgm,random")
    parser.add_argument("--allocations", default="global,uniform")
    parser.add_argument("--families", default="", help="only these families (default: all)")
    parser.add_argument("--models-per-family", type=int, default=None)
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_MODELS_PER_FAMILY} models per family, criteria "
                             f"{QUICK_CRITERIA}, speed-ups {QUICK_SPEEDUPS}")
    parser.add_argument("--runs", default="benchmarks/metanet-runs.jsonl.gz",
                        help="finished runs (JSON lines, gzip when it ends in .gz); existing "
                        "ones are skipped")
    parser.add_argument("--out", default="benchmarks/metanet.md", help="the page (+ .png)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the page from --runs without running anything")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--notes", metavar="MD",
                        help="a Markdown file appended to the page under 'Notes' (what was and "
                             "was not run, tries recorded elsewhere)")


def _numbers(text: str, kind=float) -> list:
    return [kind(item) for item in text.split(",") if item.strip()]


def checkpoint_identity(metanet: str) -> tuple[str, str]:
    """(name, short sha256 of the weights) of the checkpoint(s) the metanet row may use.

    Only the weights and the engine's head-strength choice (`metanet_choice.CHOICE_ID`) are
    hashed: documentation edits in a checkpoint's JSON (its scope, its training record) do not
    change what it computes, so they do not invalidate finished runs; a new choice does.
    """
    from metaprune.metanet.scope import checkpoint_info, discover_checkpoints
    from metaprune.pruning.metanet_choice import CHOICE_ID
    from metaprune.pruning.metanet_bridge import CHECKPOINT_DIR

    if metanet == "default":
        found = discover_checkpoints(CHECKPOINT_DIR)
        name = "default (" + ", ".join(info.name for info in found) + ")"
    else:
        found = [checkpoint_info(metanet)]
        name = found[0].name
    digest = hashlib.sha256(("".join(info.sha256 for info in found) + CHOICE_ID).encode())
    return name, digest.hexdigest()[:12]


def null_identity() -> str:
    """The null metanetwork's identity in the run log: it runs the engine's choice among the
    non-learned candidates, so a new choice (`metanet_choice.CHOICE_ID`) makes new runs."""
    from metaprune.pruning.metanet_choice import CHOICE_ID

    return "null-" + hashlib.sha256(("null-metanet" + CHOICE_ID).encode()).hexdigest()[:12]


def held_out_models(folders: list[Path], families: list[str],
                    per_family: int | None) -> list[dict]:
    """Metadata of the held-out models in `folders` (each with its ``folder``), families
    interleaved."""
    metas = [{**json.loads(path.read_text()), "folder": str(folder)} for folder in folders
             for path in sorted(folder.glob("*.meta.json"))]
    folder = ", ".join(str(f) for f in folders)
    if not metas:
        raise SystemExit(f"no corpus model in {folder}; build the held-out split first, e.g. "
                         "metaprune zoo build --families cnn1d,mlp,resnet --datasets mnist1d "
                         f"--count 18 --epochs 30 --initial-prune 1.3 --held-out-every 1 "
                         f"--seed 2 --out {folder}")
    trained_on = [meta["model_id"] for meta in metas if not meta.get("held_out")]
    if trained_on:
        raise SystemExit(f"{folder} holds models not marked held-out ({', '.join(trained_on[:3])}"
                         "...): the benchmark only reports on models no training saw")
    chosen, count = [], {}
    for meta in sorted(metas, key=lambda m: (m["family"], m["model_id"])):
        if families and meta["family"] not in families:
            continue
        count[meta["family"]] = count.get(meta["family"], 0) + 1
        if per_family is None or count[meta["family"]] <= per_family:
            chosen.append({**meta, "rank_in_family": count[meta["family"]]})
    # families interleaved (every family's first model, then every second...): a run stopped
    # early still covers every family
    return sorted(chosen, key=lambda m: (m["rank_in_family"], m["family"]))


class RunLog:
    """The JSON-lines file of finished runs: read once, appended to after every run (a ``.gz``
    file is appended to as one more gzip member, which gzip readers concatenate)."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        self._open = gzip.open if path.suffix == ".gz" else open
        if path.is_file():
            with self._open(path, "rt") as stream:
                lines = stream.read().splitlines()
            for line in lines:
                if line.strip():
                    record = _with_split(json.loads(line))
                    self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, record: dict) -> None:
        self.records[record["key"]] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._open(self.path, "at") as stream:
            stream.write(json.dumps(record) + "\n")


def is_metanet_path(method: str) -> bool:
    """Rows that run `prune(method="metanet")`, whose budget is split around the rewrite."""
    return method in ("metanet", "null-metanet") or method.startswith("metanet@")


def run_key(model_id: str, speedup: float, budget: int, method: str, seed: int,
            checkpoint: str | None, after_metanet: int) -> str:
    """The run log's key of one run; metanet-path rows also name their budget split."""
    key = f"run|{model_id}|{speedup:g}|{budget}|{method}|{seed}|{checkpoint or ''}"
    return f"{key}|after-metanet={after_metanet}" if is_metanet_path(method) else key


def _with_split(record: dict) -> dict:
    """A logged run with its budget split in its key. Runs logged before the split was recorded
    used the engine's default of that time: half the budget (rounded down) after the rewrite."""
    if record["kind"] not in ("run", "skipped") or not is_metanet_path(record["method"]) \
            or "epochs_after_metanet" in record:
        return record
    after = record["budget"] // 2
    key = run_key(record["model"], record["speedup"], record["budget"], record["method"],
                  record["seed"], record.get("checkpoint"), after)
    return {**record, "epochs_after_metanet": after,
            "key": f"{key}|skipped" if record["kind"] == "skipped" else key}


def _after_metanet(method: str, budget: int) -> int:
    """Epochs a row spends before pruning: the engine's default split for metanet-path rows."""
    from metaprune.pruning.training_bridge import metanet_epochs

    return metanet_epochs(budget, None) if is_metanet_path(method) else 0


def run(args) -> int:
    import torch

    from metaprune.bench.metanet_page import write_page

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.quick:
            args.models_per_family = args.models_per_family or QUICK_MODELS_PER_FAMILY
            args.criteria = QUICK_CRITERIA
            args.speedups = QUICK_SPEEDUPS
        log = RunLog(Path(args.runs))
        name, sha = checkpoint_identity(args.metanet)
        also = (f"metanet@{Path(args.also).stem}", checkpoint_identity(args.also)[1],
                args.also) if args.also else None
        folders = [Path(f) for f in _numbers(args.held_out, str)] if args.held_out \
            else [_default_held_out()]
        models = held_out_models(folders, _numbers(args.families, str), args.models_per_family)
        settings = {
            "speedups": _numbers(args.speedups), "budgets": _numbers(args.budgets, int),
            "seeds": _numbers(args.seeds, int), "criteria": _numbers(args.criteria, str),
            "allocations": _numbers(args.allocations, str), "quick": bool(args.quick),
        }
        started = time.perf_counter()
        if not args.report_only:
            for meta in models:
                _bench_model(meta, args.metanet, sha, settings, log, also)
        wanted = {meta["model_id"] for meta in models}
        # only metanet-path runs with the budget split the engine now uses
        null = null_identity()
        records = [r for r in log.records.values() if r["model"] in wanted
                   and r.get("checkpoint") in (None, sha, null, also and also[1])
                   and (r.get("method") != "null-metanet" or r.get("checkpoint") == null)
                   and (not is_metanet_path(r.get("method", ""))
                        or r["epochs_after_metanet"] == _after_metanet(r["method"], r["budget"]))
                   and (r["kind"] == "guard" or (r["speedup"] in settings["speedups"]
                        and r["budget"] in settings["budgets"] and r["seed"] in settings["seeds"]
                        and _method_wanted(r["method"], settings)))]
        # a model still running (a stopped or ongoing run) is left out of the page: its
        # missing rows would change which classic row is "best" and what is paired
        rows = 3 + (also is not None) + len(settings["criteria"]) * len(settings["allocations"])
        expected = rows * len(settings["speedups"]) * len(settings["budgets"]) \
            * len(settings["seeds"])
        finished = {r["model"] for r in records if r["kind"] != "guard"}
        finished = {model for model in finished if expected <= sum(
            1 for r in records if r["model"] == model and r["kind"] in ("run", "skipped"))}
        records = [r for r in records if r["model"] in finished]
        models = [meta for meta in models if meta["model_id"] in finished]
        if also is not None:  # the compared checkpoint's guard, in a table of its own
            for record in records:
                if record["kind"] == "guard" and record["checkpoint"] == also[1]:
                    record["kind"] = "guard-also"
                    record["checkpoint_name"] = also[0]
        page = write_page(Path(args.out), records, models=models, checkpoint=(name, sha),
                          settings=settings, command=_command(args), folders=folders,
                          seconds=time.perf_counter() - started,
                          notes=Path(args.notes).read_text() if args.notes else None)
        print(page)
    finally:
        torch.set_num_threads(threads)
    return 0


def _method_wanted(method: str, settings: dict) -> bool:
    if "/" not in method:
        return True
    criterion, allocation = method.split("/")
    return criterion in settings["criteria"] and allocation in settings["allocations"]


def _default_held_out() -> Path:
    from metaprune.data import cache_dir

    return cache_dir() / "corpus" / "held-out"


def _command(args) -> str:
    import sys

    return "metaprune bench metanet " + " ".join(sys.argv[sys.argv.index("metanet") + 1:]) \
        if "metanet" in sys.argv else "metaprune bench metanet"


def _loaders(meta: dict, seed: int):
    """Fresh (train, test) loaders of the model's dataset: the engine's batch size, `seed`'s
    shuffle, so every row of one seed sees the same batches and nothing carries over."""
    from metaprune.pruning.training_bridge import DATA_BATCH_SIZE

    return _dataset(meta["dataset"]).loaders(DATA_BATCH_SIZE, seed=seed,
                                             train_subset=meta.get("train_subset"))


_DATASETS: dict = {}


def _dataset(name: str):
    from metaprune.data import load_dataset

    if name not in _DATASETS:
        _DATASETS[name] = load_dataset(name)
    return _DATASETS[name]


def _bench_model(meta: dict, metanet: str, sha: str, settings: dict,
                 log: RunLog, also: tuple[str, str, str] | None = None) -> None:
    """Every missing run of one held-out model, logged as it finishes."""
    from metaprune.bench.metanet_rows import (
        ClassicPrunes,
        NullMetanet,
        finetuned_accuracy,
        metanet_run,
        sparse_learning_accuracy,
    )
    from metaprune.errors import MetaPruneError
    from metaprune.finetune import evaluate
    from metaprune.formats import load_model
    from metaprune.metanet.scope import select_metanet
    from metaprune.metanet import load_metanet

    model_id = meta["model_id"]
    model, example_inputs = load_model(Path(meta["folder"]) / meta["weights"])
    model.eval()
    # the checkpoint prune(method="metanet") picks for this model (its family, its dataset),
    # loaded once: each prune then reuses it
    chosen, entry = select_metanet(metanet, model, meta["dataset"])
    loaded = load_metanet(chosen)
    checkpoint_name = entry["name"] if entry else Path(str(metanet)).stem
    base = {"model": model_id, "family": meta["family"], "dataset": meta["dataset"]}
    steps_per_epoch = len(_loaders(meta, 0)[0])
    guard_key = f"guard|{model_id}|{sha}"
    if guard_key not in log:
        test = _loaders(meta, 0)[1]
        rewritten = loaded.transform(model, example_inputs)
        log.add({**base, "key": guard_key, "kind": "guard", "checkpoint": sha,
                 "checkpoint_name": checkpoint_name,
                 "dense": float(evaluate(model, test)),
                 "rewritten": float(evaluate(rewritten, test))})
    for speedup in settings["speedups"]:
        classic = ClassicPrunes(model, example_inputs, _loaders(meta, 0), speedup=speedup)
        for budget in settings["budgets"]:
            for seed in settings["seeds"]:
                rows = [("metanet", sha), ("null-metanet", null_identity()),
                        ("sparse-learning", None)]
                if also is not None:
                    rows.append(also[:2])
                rows += [(f"{c}/{a}", None) for c in settings["criteria"]
                         for a in settings["allocations"]]
                for method, checkpoint in rows:
                    after = _after_metanet(method, budget)
                    key = run_key(model_id, speedup, budget, method, seed, checkpoint, after)
                    split = {"epochs_after_metanet": after} if is_metanet_path(method) else {}
                    if key in log or f"{key}|skipped" in log:
                        continue
                    loaders = _loaders(meta, seed)  # fresh for every run
                    started = time.perf_counter()
                    try:
                        choice = None  # the metanet path's allocation candidate
                        if method == "metanet" or method.startswith("metanet@"):
                            accuracy, achieved, choice = metanet_run(
                                model, example_inputs,
                                loaded if method == "metanet" else load_metanet(also[2]),
                                loaders, speedup=speedup, budget=budget, seed=seed,
                                after_metanet=after)
                        elif method == "null-metanet":
                            accuracy, achieved, choice = metanet_run(
                                model, example_inputs, NullMetanet(), loaders, speedup=speedup,
                                budget=budget, seed=seed, after_metanet=after)
                        elif method == "sparse-learning":
                            accuracy, achieved = sparse_learning_accuracy(
                                model, example_inputs, loaders, speedup=speedup, budget=budget,
                                seed=seed, classic=classic)
                        else:
                            pruned, achieved = classic.pruned(*method.split("/"))
                            accuracy = finetuned_accuracy(pruned, loaders, budget=budget,
                                                          seed=seed)
                    except MetaPruneError as error:  # infeasible target, unscorable model
                        log.add({**base, "key": f"{key}|skipped", "kind": "skipped",
                                 "speedup": speedup, "budget": budget, "method": method,
                                 "seed": seed, "checkpoint": checkpoint, **split,
                                 "reason": str(error)[:300]})
                        print(f"{model_id} {speedup:g}x budget {budget} seed {seed} {method}: "
                              f"skipped ({str(error)[:120]})", flush=True)
                        continue
                    record = {**base, "key": key, "kind": "run", "speedup": speedup,
                              "budget": budget, "method": method, "seed": seed,
                              "checkpoint": checkpoint, "accuracy": accuracy, **split,
                              "checkpoint_name": checkpoint_name if checkpoint else None,
                              "achieved_speedup": achieved, "choice": choice,
                              "optimizer_steps": budget * steps_per_epoch,
                              "seconds": round(time.perf_counter() - started, 2)}
                    log.add(record)
                    print(f"{model_id} {speedup:g}x budget {budget} seed {seed} {method:18s} "
                          f"{accuracy:.4f} ({record['seconds']:.1f} s)", flush=True)
