"""Cost of the safe `.pt2` path: save (export), strict intake, torch.export.load, lifting.

For each zoo family at its default config (inputs as for MNIST-like 1×28×28 images, MNIST-1D
for the 1-D families) it prints the archive size and the median seconds of: `save_model`
(torch.export with a dynamic batch + write), the strict intake check alone (validation and
the rewritten sanitised archive), the full `load_model` (intake + torch.export.load + lifting +
attention restoration + shape recording), and the largest output difference to the original.
Asserts nothing.
"""

import statistics
import tempfile
import time
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--families", nargs="*", default=None, help="zoo family ids (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per step")


def _median_seconds(step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args) -> int:
    import torch

    from metaprune import zoo
    from metaprune.formats import IntakeLimits, load_model, save_model
    from metaprune.formats.intake import sanitised_archive

    torch.set_num_threads(1)
    families = args.families or list(zoo.FAMILIES)
    print(f"{'family':<12} {'params':>9} {'MiB':>6} {'save s':>7} {'intake s':>9} {'load s':>7} {'max |diff|':>11}")
    with tempfile.TemporaryDirectory() as folder:
        for family in families:
            shape = (1, 40) if family in ("mlp", "cnn1d") else (1, 28, 28)
            model = zoo.build(family, zoo.default_config(family, input_shape=shape, num_classes=10)).eval()
            inputs = (torch.randn(2, *shape),)
            path = Path(folder) / f"{family}.pt2"
            save = _median_seconds(lambda: save_model(model, inputs, path), args.repeats)
            intake = _median_seconds(lambda: sanitised_archive(path, IntakeLimits()), args.repeats)
            load = _median_seconds(lambda: load_model(path), args.repeats)
            lifted, _ = load_model(path)
            with torch.no_grad():
                diff = (lifted(*inputs) - model(*inputs)).abs().max().item()
            params = sum(p.numel() for p in model.parameters())
            print(f"{family:<12} {params:>9,} {path.stat().st_size / 2**20:>6.2f} {save:>7.2f} "
                  f"{intake:>9.3f} {load:>7.2f} {diff:>11.2e}")
    return 0
