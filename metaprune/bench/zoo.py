"""Train zoo models to corpus accuracy: a CNN1d on MNIST-1D, a ResNet-8 on Fashion-MNIST.

Shows that small zoo models reach the accuracy a corpus needs (> 85 %) in a few CPU minutes.
Prints accuracy, epochs, wall and CPU time per run; asserts nothing. Fashion-MNIST must be in
the cache first (`metaprune data fetch fashion-mnist`); without it that run is skipped with the
reason.
"""

import time
from dataclasses import dataclass, field

TARGET_ACCURACY = 0.85


@dataclass
class Run:
    """One training run of the benchmark."""

    dataset: str  # dataset id for metaprune.data.load_dataset
    family: str  # zoo family id
    overrides: dict  # config keys on top of the family's defaults for the dataset's input
    epochs: int
    train_subset: int | None  # first N shuffled training samples, or all
    finetune: dict = field(default_factory=dict)  # FinetuneConfig settings


def runs(args) -> list[Run]:
    return [
        Run(
            dataset="mnist1d",
            family="cnn1d",
            overrides={"widths": [32, 64, 64], "kernel_sizes": [5, 5, 3], "head": "flatten",
                       "hidden": [128]},
            epochs=args.mnist1d_epochs,
            train_subset=None,
            finetune={"optimizer": "adamw", "lr": 3e-3, "schedule": "cosine"},
        ),
        Run(
            dataset="fashion-mnist",
            family="resnet",
            overrides={"depth": 8, "stage_widths": [16, 32, 64]},
            epochs=args.fashion_epochs,
            train_subset=args.fashion_subset,
            finetune={"optimizer": "adamw", "lr": 3e-3, "schedule": "cosine"},
        ),
    ]


def add_arguments(parser) -> None:
    parser.add_argument("--mnist1d-epochs", type=int, default=10)
    parser.add_argument("--fashion-epochs", type=int, default=3)
    parser.add_argument(
        "--fashion-subset", type=int, default=20_000, help="training samples (of 60,000)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine more threads only contend)",
    )


def run(args) -> int:
    import torch

    from metaprune import zoo
    from metaprune.data import load_dataset
    from metaprune.errors import DatasetUnavailableError
    from metaprune.finetune import FinetuneConfig, evaluate, train
    from metaprune.measure import count_macs, count_params

    torch.set_num_threads(args.threads)
    print(f"torch threads: {args.threads}; target: test accuracy > {TARGET_ACCURACY:.0%}")
    for spec in runs(args):
        try:
            data = load_dataset(spec.dataset)
        except DatasetUnavailableError as error:
            print(f"{spec.family} on {spec.dataset}: skipped: {error}")
            continue
        torch.manual_seed(args.seed)
        config = zoo.default_config(
            spec.family,
            input_shape=data.input_shape,
            num_classes=data.num_classes,
            **spec.overrides,
        )
        model = zoo.build(spec.family, config)
        train_loader, test_loader = data.loaders(
            args.batch_size, seed=args.seed, train_subset=spec.train_subset
        )
        started, cpu_started = time.perf_counter(), time.process_time()
        history = train(
            model,
            train_loader,
            epochs=spec.epochs,
            config=FinetuneConfig(seed=args.seed, **spec.finetune),
            eval_loader=None,
            progress=False,
        )
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        accuracy = evaluate(model, test_loader)
        samples = len(train_loader.dataset)
        print(
            f"{spec.family} on {spec.dataset}: test accuracy {accuracy:.2%} "
            f"({'meets' if accuracy > TARGET_ACCURACY else 'MISSES'} the target), "
            f"{len(history)} epochs on {samples} samples, training {seconds:.1f} s wall "
            f"({cpu_seconds:.1f} s CPU), "
            f"{count_params(model):,} params, "
            f"{count_macs(model, zoo.example_inputs(config, batch=1)):,} MACs"
        )
        print(f"  config: {config}")
    return 0
