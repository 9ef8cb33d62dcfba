"""What the corpus holds: one task per model, with its sampled architecture and recipe.

A task is fully determined by (family, dataset, index, seed): the model id names those four, and
the architecture, the training recipe and the held-out flag are drawn from a generator seeded by
them. Re-planning with the same arguments therefore gives the same ids and the same models, which
is what lets an interrupted build resume (finished ids are skipped), and a larger `count` extends
a corpus without changing the models it already has.

Widths are kept small so that one model trains in seconds to a minute on one CPU core.

Example::

    tasks = plan_corpus(["mlp", "cnn1d"], ["mnist1d"], count=4, epochs=3, seed=0)
    [task.model_id for task in tasks]
    # ['mnist1d-mlp-000-s0', 'mnist1d-cnn1d-000-s0', 'mnist1d-mlp-001-s0', 'mnist1d-cnn1d-001-s0']
    tasks[0].config["hidden"]    # e.g. [88, 40]
"""

import math
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from metaprune import zoo
from metaprune.errors import InvalidTargetError

# Per-sample input shapes of the datasets a corpus can use (channel first).
DATASET_SHAPES: dict[str, tuple[int, ...]] = {
    "mnist1d": (1, 40),
    "digits": (1, 8, 8),
    "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}
NUM_CLASSES = 10


class Draw:
    """Random choices for one config; `unseen` moves every range just past its training range.

    Held-out models built with `unseen=True` have widths above and depths one past anything
    sampled for training models, to test generalisation to architectures never seen.
    """

    def __init__(self, rng: random.Random, unseen: bool):
        # rng: the model's own seeded generator; unseen: draw outside the training ranges.
        self.rng = rng
        self.unseen = unseen

    def width(self, low: int, high: int) -> int:
        """A layer width in [low, high] (unseen: in (high, 1.5 high])."""
        if self.unseen:
            return self.rng.randint(high + 1, high * 3 // 2)
        return self.rng.randint(low, high)

    def count(self, low: int, high: int) -> int:
        """A number of layers or blocks in [low, high] (unseen: high + 1)."""
        return high + 1 if self.unseen else self.rng.randint(low, high)

    def choice(self, options: Sequence):
        return self.rng.choice(list(options))


def _mlp(draw: Draw, shape: tuple[int, ...]) -> dict:
    if draw.rng.random() < 0.3:
        width = draw.width(32, 96)
        return {"residual": True, "width": width,
                "hidden": [draw.width(16, 96) for _ in range(draw.count(1, 2))]}
    layers = draw.count(1, 3)
    return {"residual": False, "width": None,
            "hidden": [draw.width(24, 160) for _ in range(layers)]}


def _cnn1d(draw: Draw, shape: tuple[int, ...]) -> dict:
    layers = draw.count(2, 4)
    return {
        "widths": [draw.width(8, 48) for _ in range(layers)],
        "kernel_sizes": [draw.choice((3, 5, 7)) for _ in range(layers)],
        "head": draw.choice(("gap", "flatten")),
        "hidden": draw.choice(([], [draw.width(16, 64)])),
    }


def _resnet(draw: Draw, shape: tuple[int, ...]) -> dict:
    blocks = draw.count(1, 2)  # depth 8 or 14 (unseen: 20)
    base = draw.width(6, 14)
    stage_widths = [base, draw.width(base, 2 * base), draw.width(2 * base, 3 * base)]
    return {
        "dims": len(shape) - 1,
        "depth": 6 * blocks + 2,
        "stage_widths": stage_widths,
        "block_widths": [
            [draw.width(max(1, width // 2), width) for _ in range(blocks)]
            for width in stage_widths
        ],
    }


def _vit(draw: Draw, shape: tuple[int, ...]) -> dict:
    embed_dim = 4 * draw.width(4, 12)  # a multiple of 4, so 1, 2 or 4 heads divide it
    patch = draw.choice((4, 5, 8)) if len(shape) == 2 else draw.choice((4, 5))
    return {
        "patch_size": patch,
        "embed_dim": embed_dim,
        "blocks": [
            {"heads": draw.choice((1, 2, 4)), "mlp": draw.width(embed_dim, 3 * embed_dim)}
            for _ in range(draw.count(1, 3))
        ],
        "pool": draw.choice(("cls", "mean")),
    }


def _vgg(draw: Draw, shape: tuple[int, ...]) -> dict:
    stages = [
        [draw.width(8, 24) * (s + 1) for _ in range(draw.count(1, 2))]
        for s in range(draw.choice((2, 3)))
    ]
    return {"stages": stages, "hidden": draw.choice(([], [draw.width(32, 96)]))}


def _mobilenetv2(draw: Draw, shape: tuple[int, ...]) -> dict:
    stem = draw.width(8, 16)
    blocks, in_width = [], stem
    for out, stride in ((draw.width(8, 16), 1), (draw.width(12, 24), 2), (draw.width(16, 32), 2)):
        for repeat in range(draw.count(1, 2)):
            blocks.append({"hidden": in_width * draw.choice((2, 3, 4)), "out": out,
                           "stride": stride if repeat == 0 else 1})
            in_width = out
    # A strided stem on 28x28 inputs: depthwise convs at full resolution are slow on a CPU core.
    return {"stem_width": stem, "stem_stride": 2 if min(shape[1:]) >= 28 else 1, "blocks": blocks,
            "last_width": draw.width(48, 128)}


def _densenet(draw: Draw, shape: tuple[int, ...]) -> dict:
    growth = draw.width(4, 8)
    blocks = [
        [{"width": draw.width(12, 24), "growth": growth} for _ in range(draw.count(2, 3))]
        for _ in range(draw.choice((2, 3)))
    ]
    return {"stem_width": draw.width(8, 16), "blocks": blocks}


# Family id -> (the numbers of spatial input dims it is sampled for, its config sampler).
SAMPLERS: dict[str, tuple[tuple[int, ...], Callable[[Draw, tuple[int, ...]], dict]]] = {
    "mlp": ((1, 2), _mlp),
    "cnn1d": ((1,), _cnn1d),
    "resnet": ((1, 2), _resnet),
    "vit": ((1, 2), _vit),
    "vgg": ((2,), _vgg),
    "mobilenetv2": ((2,), _mobilenetv2),
    "densenet": ((2,), _densenet),
}


def sample_config(family: str, dataset: str, rng: random.Random, *, unseen: bool = False) -> dict:
    """A full, checked zoo config of `family` for `dataset`'s inputs, drawn with `rng`.

    Example::

        sample_config("resnet", "fashion-mnist", random.Random(3))["depth"]   # 8 or 14
    """
    shape = DATASET_SHAPES[dataset]
    overrides = SAMPLERS[family][1](Draw(rng, unseen), shape)
    return zoo.default_config(family, input_shape=shape, num_classes=NUM_CLASSES, **overrides)


def sample_recipe(rng: random.Random, *, epochs: int) -> dict:
    """Optimizer, learning rate (log-uniform), epochs (between half of `epochs` and `epochs`)."""
    optimizer = rng.choice(("sgd", "adamw"))
    low, high = (0.02, 0.1) if optimizer == "sgd" else (1e-3, 6e-3)
    lr = math.exp(rng.uniform(math.log(low), math.log(high)))
    return {
        "optimizer": optimizer,
        "lr": round(lr, 5),
        "schedule": "cosine",
        "epochs": rng.randint(max(1, (epochs + 1) // 2), epochs),
        "batch_size": rng.choice((64, 128)),
    }


@dataclass(frozen=True)
class CorpusTask:
    """Everything needed to train one corpus model (JSON-serialisable via `to_dict`)."""

    model_id: str  # dataset-family-index-sSEED, the file stem in the corpus folder
    family: str  # zoo family id
    dataset: str  # dataset id
    index: int  # position among this (family, dataset) pair's models
    seed: int  # the corpus seed named in the id
    model_seed: int  # derived from all four above; seeds weights, data order and sampling
    config: dict  # the full zoo config
    recipe: dict  # optimizer, lr, schedule, epochs, batch_size
    held_out: bool  # reserved for evaluating the metanetwork, never trained on
    unseen: bool  # held out with a width/depth outside the training ranges
    train_subset: int | None  # training samples used (None: the whole training set)
    initial_prune: float | None  # speed-up of the initial l2 pruning (None: not pruned)

    def to_dict(self) -> dict:
        return asdict(self)


def model_id(family: str, dataset: str, index: int, seed: int) -> str:
    """The file stem of a corpus model, e.g. `fashion-mnist-resnet-007-s0`."""
    return f"{dataset}-{family}-{index:03d}-s{seed}"


def _model_seed(family: str, dataset: str, index: int, seed: int) -> int:
    # crc32, not hash(): Python salts str hashes per process, and this must be stable.
    return zlib.crc32(f"{seed}/{family}/{dataset}/{index}".encode()) & 0x7FFFFFFF


def pairs_for(families: Sequence[str], datasets: Sequence[str]) -> list[tuple[str, str]]:
    """(family, dataset) pairs whose input rank the family is sampled for, dataset-major."""
    for family in families:
        if family not in SAMPLERS:
            raise InvalidTargetError(
                f"unknown corpus family {family!r}; known: {', '.join(SAMPLERS)}")
    for dataset in datasets:
        if dataset not in DATASET_SHAPES:
            raise InvalidTargetError(
                f"unknown corpus dataset {dataset!r}; known: {', '.join(DATASET_SHAPES)}")
    pairs = [
        (family, dataset)
        for dataset in datasets
        for family in families
        if len(DATASET_SHAPES[dataset]) - 1 in SAMPLERS[family][0]
    ]
    if not pairs:
        raise InvalidTargetError(
            f"none of the families {list(families)} applies to the datasets {list(datasets)}")
    return pairs


def plan_corpus(
    families: Sequence[str],
    datasets: Sequence[str],
    *,
    count: int,
    epochs: int,
    seed: int = 0,
    train_subset: int | None = None,
    initial_prune: float | None = None,
    held_out_every: int = 5,
    unseen_held_out: bool = False,
) -> list[CorpusTask]:
    """`count` tasks spread round-robin over the applicable (family, dataset) pairs.

    Families that do not fit a dataset's input rank are skipped for it (`cnn1d` is 1-D only;
    `vgg`, `mobilenetv2`, `densenet` are 2-D only). Each pair's every `held_out_every`-th model
    (indices 4, 9, ... for 5) is held out; with `unseen_held_out` those get widths and depths
    outside the training ranges.

    Raises:
        InvalidTargetError: unknown family or dataset, no applicable pair, or bad numbers.
    """
    if count < 1 or epochs < 1 or held_out_every < 1:
        raise InvalidTargetError(
            f"count, epochs and held_out_every must be positive; got {count}, {epochs}, "
            f"{held_out_every}")
    if initial_prune is not None and initial_prune <= 1.0:
        raise InvalidTargetError(f"initial_prune is a speed-up > 1, got {initial_prune}")
    pairs = pairs_for(families, datasets)
    tasks = []
    for position in range(count):
        family, dataset = pairs[position % len(pairs)]
        index = position // len(pairs)
        model_seed = _model_seed(family, dataset, index, seed)
        rng = random.Random(model_seed)
        held_out = index % held_out_every == held_out_every - 1
        unseen = held_out and unseen_held_out
        tasks.append(CorpusTask(
            model_id=model_id(family, dataset, index, seed),
            family=family,
            dataset=dataset,
            index=index,
            seed=seed,
            model_seed=model_seed,
            config=sample_config(family, dataset, rng, unseen=unseen),
            recipe=sample_recipe(rng, epochs=epochs),
            held_out=held_out,
            unseen=unseen,
            train_subset=train_subset,
            initial_prune=initial_prune,
        ))
    return tasks
