"""Pruning engine: one-shot exact targets vs torch-pruning's iterative loop; criteria table.

Default run: a ResNet-56-shaped model (CIFAR input) pruned to 2.5x fewer MACs, our prune-only
wall time next to torch-pruning's iterative global pruning (MagnitudePruner, `global_pruning`,
`iterative_steps`, stepping until the speed-up is met, the DepGraph reference's way) measured in
the same run, and each pruned model's measured CPU latency speed-up next to its MACs speed-up.

`--table`: every criterion at 2x and 3x on MNIST-1D (CNN1d) and Fashion-MNIST (small VGG),
same fine-tune budget; accuracy right after pruning (BatchNorm recalibrated, no training) and
after fine-tuning, as mean ± standard error over `--seeds` seeds.
"""

import math
import statistics
import time

import torch

PRUNE_PHASES = ("graph", "score", "allocate", "prune", "verify")


def add_arguments(parser) -> None:
    parser.add_argument("--speedup", type=float, default=2.5, help="target MACs speed-up")
    parser.add_argument("--depth", type=int, default=56, help="ResNet depth (6n + 2)")
    parser.add_argument("--steps", type=int, default=400,
                        help="torch-pruning iterative_steps (the reference uses 400)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 keeps timings stable on shared machines)")
    parser.add_argument("--table", action="store_true",
                        help="run the criteria table instead of the timing comparison")
    parser.add_argument("--datasets", default="mnist1d,fashion-mnist",
                        help="table: comma-separated dataset ids")
    parser.add_argument("--targets", default="2,3", help="table: comma-separated speed-ups")
    parser.add_argument("--seeds", type=int, default=2, help="table: models trained per dataset")
    parser.add_argument("--epochs", type=int, default=10, help="table: dense training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=3,
                        help="table: fine-tune epochs after pruning (same for every criterion)")
    parser.add_argument("--train-subset", type=int, default=10000,
                        help="table: training images used per dataset (Fashion-MNIST has 60k)")


def run(args) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.table:
            _criteria_table(args)
        else:
            _timing(args)
    finally:
        torch.set_num_threads(threads)
    return 0


def _resnet(depth: int):
    from metaprune import zoo

    torch.manual_seed(0)
    config = zoo.default_config("resnet", input_shape=(3, 32, 32), num_classes=10, depth=depth)
    return zoo.build("resnet", config).eval(), (torch.randn(1, 3, 32, 32),)


def _torch_pruning_iterative(model, example_inputs, speedup: float, steps: int):
    """The DepGraph reference's progressive pruning: step until the MACs speed-up is met."""
    import torch_pruning as tp

    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    started = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(
        model, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
        iterative_steps=steps, pruning_ratio=1.0, global_pruning=True, max_pruning_ratio=0.9,
        ignored_layers=[classifier],
    )
    base_ops, _ = tp.utils.count_ops_and_params(model, example_inputs=example_inputs)
    achieved, done = 1.0, 0
    while achieved < speedup and done < steps:
        pruner.step()
        done += 1
        ops, _ = tp.utils.count_ops_and_params(model, example_inputs=example_inputs)
        achieved = base_ops / ops
    return time.perf_counter() - started, done


def _timing(args) -> None:
    from metaprune.measure import count_macs, measure_latency_ms
    from metaprune.pruning import prune

    model, example_inputs = _resnet(args.depth)
    print(f"ResNet-{args.depth} (3x32x32, 10 classes), target speed-up {args.speedup}x, "
          f"{torch.get_num_threads()} thread(s)")
    result = prune(model, example_inputs, method="l2", speedup=args.speedup)
    ours = sum(result.report["seconds"].get(phase, 0.0) for phase in PRUNE_PHASES)
    report = result.report

    reference = _resnet(args.depth)[0]
    theirs, steps = _torch_pruning_iterative(reference, example_inputs, args.speedup, args.steps)
    dense_macs = count_macs(model, example_inputs)
    their_speedup = dense_macs / count_macs(reference, example_inputs)
    # Latencies measured back to back, interleaved, so machine load hits all three alike.
    samples = {"dense": [], "ours": [], "theirs": []}
    for _ in range(3):
        for key, module in (("dense", model), ("ours", result.model), ("theirs", reference)):
            samples[key].append(measure_latency_ms(module, example_inputs, batch=64, repeats=7))
    dense_ms, our_ms, their_ms = (statistics.median(samples[k]) for k in ("dense", "ours", "theirs"))

    print(f"{'':34s}{'prune s':>9s}{'MACs x':>9s}{'latency x':>11s}")
    print(f"{'metaprune (one shot, analytic)':34s}{ours:9.2f}{report['speedup']:9.3f}"
          f"{dense_ms / our_ms:11.2f}")
    print(f"{f'torch-pruning iterative ({steps} steps)':34s}{theirs:9.2f}{their_speedup:9.3f}"
          f"{dense_ms / their_ms:11.2f}")
    print(f"wall-time ratio torch-pruning / metaprune: {theirs / ours:.1f}x")
    print("metaprune phases (s): " + ", ".join(
        f"{phase} {report['seconds'].get(phase, 0.0):.2f}" for phase in PRUNE_PHASES))
    print(f"latency batch 64 (median of 3x7 runs): dense {dense_ms:.1f} ms, metaprune "
          f"{our_ms:.1f} ms, torch-pruning {their_ms:.1f} ms")


def _table_model(dataset: str, seed: int):
    from metaprune import zoo

    torch.manual_seed(seed)
    if dataset == "mnist1d":
        config = zoo.default_config("cnn1d", input_shape=(1, 40), num_classes=10)
        return zoo.build("cnn1d", config), (torch.randn(1, 1, 40),)
    config = zoo.default_config("vgg", input_shape=(1, 28, 28), num_classes=10,
                                stages=[[16, 16], [32, 32], [64]], hidden=[64])
    return zoo.build("vgg", config), (torch.randn(1, 1, 28, 28),)


def _mean_se(values: list[float]) -> str:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{100 * mean:6.2f} ± {100 * se:4.2f}"


def _criteria_table(args) -> None:
    from metaprune.criteria import CRITERIA
    from metaprune.data import load_dataset
    from metaprune.finetune import FinetuneConfig, evaluate, train
    from metaprune.pruning import prune

    targets = [float(t) for t in args.targets.split(",")]
    finetune = {"optimizer": "adamw", "lr": 1e-3}
    for dataset in args.datasets.split(","):
        dense, results = [], {}
        for seed in range(args.seeds):
            loaders = load_dataset(dataset).loaders(128, seed=seed,
                                                    train_subset=args.train_subset)
            model, example_inputs = _table_model(dataset, seed)
            started = time.perf_counter()
            train(model, loaders[0], epochs=args.epochs, progress=False,
                  config=FinetuneConfig(optimizer="adamw", lr=3e-3, seed=seed))
            dense.append(evaluate(model, loaders[1]))
            print(f"{dataset} seed {seed}: dense {100 * dense[-1]:.2f}% "
                  f"({time.perf_counter() - started:.0f} s training)", flush=True)
            for target in targets:
                for criterion in CRITERIA:
                    pruned_only = prune(model, example_inputs, criterion=criterion,
                                        speedup=target, data=loaders).report
                    report = prune(model, example_inputs, criterion=criterion, speedup=target,
                                   data=loaders, finetune_epochs=args.finetune_epochs,
                                   finetune=finetune).report
                    results.setdefault((target, criterion), []).append(
                        (pruned_only["accuracy_after"], report["accuracy_after"],
                         report["speedup"]))
                    print(f"  seed {seed} {target:.1f}x {criterion:9s} pruned "
                          f"{100 * pruned_only['accuracy_after']:.2f}% fine-tuned "
                          f"{100 * report['accuracy_after']:.2f}%", flush=True)
        print(f"\n{dataset}: {args.seeds} seed(s), dense accuracy {_mean_se(dense)} %, "
              f"{args.finetune_epochs} fine-tune epochs (AdamW 1e-3), global allocation")
        print(f"{'target':>7s} {'criterion':10s} {'pruned %':>16s} {'fine-tuned %':>16s} "
              f"{'speed-up':>9s}")
        for (target, criterion), rows in results.items():
            print(f"{target:6.1f}x {criterion:10s} {_mean_se([r[0] for r in rows]):>16s} "
                  f"{_mean_se([r[1] for r in rows]):>16s} "
                  f"{statistics.fmean(r[2] for r in rows):9.3f}", flush=True)
