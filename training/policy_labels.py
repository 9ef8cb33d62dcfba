"""Training labels for the sparsity head: the best tuned policy per (corpus model, speed-up).

For every selected corpus TRAINING model and every speed-up, the policy search of
`metaprune.training.tune` (`run_search`: random policies, l2 prune to the target, a short
fine-tune) runs once; its most accurate policy meeting the target becomes the label. Each label
is one JSON file in the output folder, ``MODEL@Sx.json``, written atomically once its search
has finished, so an interrupted run resumes where it stopped (finished labels are skipped). The
search's own files (trials, figure, Ray's results) go to ``searches/MODEL@Sx/``.

A label holds ``format``, ``model``, ``dataset``, ``family``, ``speedup``, ``policy`` (group
root module -> keep ratio, or null when no trial met the target), ``accuracy`` (of the best
trial), ``accuracy_before`` (dense), ``trials`` (each complete trial's policy and accuracy, for
losses that use more than the winner), ``samples``, ``finetune_epochs`` and ``search_seconds``
(wall time of the whole search: the prune-time cost a head forward pass replaces, and the
one-off cost of building labels).

All searches share one private Ray (127.0.0.1, `workers` CPUs), started once.

Example::

    from metaprune.training.policy_labels import LabelSettings, build_labels, read_labels

    settings = LabelSettings(corpus="/work/corpus", out_dir="/work/runs/head/labels",
                             speedups=(2.0, 3.0), samples=8, finetune_epochs=1, max_models=12,
                             datasets=("mnist1d",), workers=1)
    summary = build_labels(settings)        # {'written': 24, 'skipped': 0, 'seconds': 910.2, ...}
    labels = read_labels("/work/runs/head/labels")
    labels[0]["policy"]                     # {'features.0.unit.conv': 0.83, ...}
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from metaprune.errors import InvalidTargetError

from .corpus import print_line
from .corpus_store import write_atomically
from .metatrain_tasks import CorpusTasks

LABEL_FORMAT = "metaprune-policy-label/1"
SEARCHES_DIR = "searches"  # each search's trials, figure and Ray results, under the label folder


@dataclass
class LabelSettings:
    """Which labels to build and how hard each search looks; JSON-serialisable.

    Example::

        LabelSettings(corpus="/work/corpus", out_dir="labels", speedups=(2.0, 3.0), samples=8)
    """

    corpus: str  # the corpus folder (only its training models are labelled)
    out_dir: str  # one MODEL@Sx.json per label, plus searches/ with each search's files
    speedups: tuple = (2.0, 3.0)  # MACs speed-ups to label every model at
    samples: int = 8  # trials per search
    finetune_epochs: int = 1  # fine-tune epochs per trial
    max_models: int | None = None  # label at most this many models (None: all selected)
    families: tuple = ()  # only these families (empty: all)
    datasets: tuple = ()  # only these datasets (empty: all)
    workers: int = 1  # CPUs of the shared local Ray, one trial per CPU
    seed: int = 0  # seed of every search's random draws

    def __post_init__(self) -> None:
        self.speedups = tuple(float(s) for s in self.speedups)
        self.families, self.datasets = tuple(self.families), tuple(self.datasets)
        if not self.speedups or any(not s > 1.0 for s in self.speedups):
            raise InvalidTargetError(f"speed-ups must be numbers above 1, got {self.speedups}")
        if self.max_models is not None and self.max_models < 1:
            raise InvalidTargetError(f"--models must be at least 1, got {self.max_models}")


def label_name(model_id: str, speedup: float) -> str:
    """File name of one label.

    Example::

        label_name("mnist1d-mlp-000-s0", 2.0)   # 'mnist1d-mlp-000-s0@2x.json'
    """
    return f"{model_id}@{speedup:g}x.json"


def select_models(tasks: CorpusTasks, max_models: int | None) -> list[str]:
    """Training model ids, interleaved across families so a prefix covers every family.

    Example::

        select_models(tasks, 4)   # ['mnist1d-cnn1d-000-s0', 'mnist1d-mlp-000-s0',
                                  #  'mnist1d-resnet-000-s0', 'mnist1d-vit-000-s0']
    """
    by_family: dict[tuple, list[str]] = {}
    for model_id in tasks.train_ids:
        meta = tasks.meta[model_id]
        by_family.setdefault((meta["dataset"], meta["family"]), []).append(model_id)
    columns = [by_family[key] for key in sorted(by_family)]
    interleaved = [column[row] for row in range(max(map(len, columns)))
                   for column in columns if row < len(column)]
    return interleaved if max_models is None else interleaved[:max_models]


def label_document(summary: dict, model_id: str, meta: dict, speedup: float,
                   settings: LabelSettings) -> dict:
    """The label of one finished search (`run_search`'s summary)."""
    best = summary["best"]
    complete = [{"policy": t["policy"], "accuracy": t["accuracy"]}
                for t in summary["trials"] if t["status"] == "complete" and t["meets_target"]]
    return {
        "format": LABEL_FORMAT,
        "model": model_id,
        "dataset": meta["dataset"],
        "family": meta["family"],
        "speedup": float(speedup),
        "policy": None if best is None else best["policy"],
        "accuracy": None if best is None else best["accuracy"],
        "accuracy_before": summary["accuracy_before"],
        "trials": complete,
        "samples": settings.samples,
        "finetune_epochs": settings.finetune_epochs,
        "search_seconds": summary["seconds"],
    }


def build_labels(settings: LabelSettings, *, log: Callable[[str], None] | None = None) -> dict:
    """Run the missing searches and write their labels; returns a summary.

    Returns ``{"written", "skipped", "without_policy", "seconds", "search_seconds", "labels"}``:
    counts of labels written now, found finished, and written without a policy (no trial met the
    target), this call's wall time, the summed search time of every label in the folder, and
    the label paths.
    """
    from metaprune.training.corpus import start_ray
    from metaprune.training.tune import TuneSettings, run_search
    import ray

    log = log or print_line
    started = time.perf_counter()
    tasks = CorpusTasks(settings.corpus, families=list(settings.families),
                        datasets=list(settings.datasets))
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "settings.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    jobs = [(model_id, speedup) for model_id in select_models(tasks, settings.max_models)
            for speedup in settings.speedups]
    pending = [(m, s) for m, s in jobs if not _finished(out_dir / label_name(m, s))]
    written = without_policy = 0
    started_ray = bool(pending) and not ray.is_initialized()
    if started_ray:
        # one Ray for every search: `run_search` uses a running one instead of starting its own
        start_ray(settings.workers, None)
    try:
        for index, (model_id, speedup) in enumerate(pending, 1):
            meta = tasks.meta[model_id]
            name = label_name(model_id, speedup)
            tune_settings = TuneSettings(
                model=str(tasks.folder / meta["weights"]), dataset=meta["dataset"],
                speedup=speedup, samples=settings.samples,
                finetune_epochs=settings.finetune_epochs, seed=settings.seed,
                workers=settings.workers, out_dir=str(out_dir / SEARCHES_DIR / Path(name).stem))
            summary = run_search(tune_settings, log=lambda line: None)
            document = label_document(summary, model_id, meta, speedup, settings)
            write_atomically(out_dir / name, (json.dumps(document, indent=1) + "\n").encode())
            written += 1
            without_policy += document["policy"] is None
            accuracy = "no trial met the target" if document["accuracy"] is None \
                else f"best accuracy {document['accuracy']:.4f} " \
                     f"(dense {document['accuracy_before']:.4f})"
            log(f"[{index}/{len(pending)}] {name}: {accuracy}, "
                f"{document['search_seconds']:.1f} s")
    finally:
        if started_ray:
            ray.shutdown()
    labels = [out_dir / label_name(m, s) for m, s in jobs]
    return {"written": written, "skipped": len(jobs) - len(pending),
            "without_policy": without_policy,
            "seconds": round(time.perf_counter() - started, 1),
            "search_seconds": round(sum(json.loads(p.read_text())["search_seconds"]
                                        for p in labels), 1),
            "labels": [str(p) for p in labels]}


def _finished(path: Path) -> bool:
    """A label file that is complete JSON of our format (a torn write never is: see
    `write_atomically`, but a hand-edited or foreign file must not be trusted)."""
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == LABEL_FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def read_labels(folder, *, model_ids: Sequence[str] | None = None) -> list[dict]:
    """Every label with a policy in `folder` (optionally only these models), by file name.

    Raises:
        InvalidTargetError: the folder holds no usable label.
    """
    folder = Path(folder)
    labels = []
    for path in sorted(folder.glob("*@*x.json")):
        if not _finished(path):
            continue
        document = json.loads(path.read_text())
        if document["policy"] and (model_ids is None or document["model"] in model_ids):
            labels.append(document)
    if not labels:
        raise InvalidTargetError(f"no policy label in {folder} (build them with "
                                 "`metaprune metanet labels`)")
    return labels

