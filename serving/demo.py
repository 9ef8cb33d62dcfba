"""`make demo`: a model trained on the spot, pruned through a local MetaPrune server.

1. trains a small CNN1d on MNIST-1D (offline, a few seconds) and saves it as ``.pt2``;
2. starts ``metaprune serve`` on 127.0.0.1 with an ephemeral port;
3. sends the model through the Python client (upload, job, progress events, download);
4. measures the original and the received pruned model locally: accuracy, MACs, parameters,
   CPU latency; writes the report JSON and the sparsity plot; stops the server.

Run: ``python -m metaprune.serving.demo [--out DIR] [--speedup 2] [--epochs 10]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def _train_model(epochs: int):
    import torch
    from metaprune import zoo
    from metaprune.data import load_dataset
    from metaprune.finetune import FinetuneConfig, evaluate, train

    torch.set_num_threads(1)  # a small model: threads only add contention on a shared CPU
    data = load_dataset("mnist1d")
    train_loader, test_loader = data.loaders(batch_size=128, seed=0)
    config = zoo.default_config("cnn1d", input_shape=data.input_shape, num_classes=data.num_classes)
    torch.manual_seed(0)
    model = zoo.build("cnn1d", config)
    train(model, train_loader, epochs=epochs, eval_loader=test_loader, progress=False,
          config=FinetuneConfig.from_dict({"optimizer": "adamw", "lr": 3e-3}))
    model.eval()
    return model, (data.x_test[:1],), test_loader, evaluate


def _measure(path: Path, test_loader, evaluate) -> dict:
    from metaprune.formats import load_model
    from metaprune.measure import count_macs, count_params, measure_latency_ms

    model, inputs = load_model(path)
    return {"accuracy": evaluate(model, test_loader), "macs": count_macs(model, inputs),
            "params": count_params(model), "latency_ms": measure_latency_ms(model, inputs, batch=64)}


def run(out: Path, *, speedup: float, epochs: int, finetune_epochs: int) -> dict:
    from metaprune.formats import save_model

    from .client import prune_remote
    from .process import ServerProcess

    shutil.rmtree(out / "server-state", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    model, example_inputs, test_loader, evaluate = _train_model(epochs)
    original, pruned = out / "cnn1d-mnist1d.pt2", out / "cnn1d-mnist1d-pruned.pt2"
    save_model(model, example_inputs, original)
    print(f"trained a CNN1d on MNIST-1D in {time.perf_counter() - began:.1f} s -> {original}")

    with ServerProcess(out / "server-state") as server:
        print(f"server listening on {server.address} (pid {server.pid})")
        report = prune_remote(
            server.address, original, pruned, report_path=out / "report.json", progress=True,
            options={"method": "l2", "speedup": speedup, "dataset": "mnist1d",
                     "finetune_epochs": finetune_epochs},
        )
        print(f"server resident memory {server.rss_bytes() / (1 << 20):.0f} MiB; stopping it")
    before, after = _measure(original, test_loader, evaluate), _measure(pruned, test_loader, evaluate)
    print(f"\n{'':12s}{'before':>14s}{'after':>14s}")
    print(f"{'accuracy':12s}{before['accuracy']:>14.2%}{after['accuracy']:>14.2%}")
    print(f"{'MACs':12s}{before['macs']:>14,}{after['macs']:>14,}   speed-up {before['macs'] / after['macs']:.2f}x")
    print(f"{'params':12s}{before['params']:>14,}{after['params']:>14,}")
    print(f"{'latency ms':12s}{before['latency_ms']:>14.2f}{after['latency_ms']:>14.2f}   (CPU, batch 64)")
    print(f"\nreport  {out / 'report.json'}")
    try:
        from metaprune.report import plot_sparsity
    except ImportError:
        print("plot    skipped (metaprune.report.plot_sparsity is not available)")
    else:
        print(f"plot    {plot_sparsity(report, out / 'sparsity.png')}")
    (out / "measured.json").write_text(json.dumps({"before": before, "after": after}, indent=2))
    return {"before": before, "after": after, "report": report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "metaprune-demo",
                        help="folder for the models, report and plot")
    parser.add_argument("--speedup", type=float, default=2.0, help="MACs before / after (default 2)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of the model")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="fine-tuning after pruning")
    args = parser.parse_args(argv)
    run(args.out, speedup=args.speedup, epochs=args.epochs, finetune_epochs=args.finetune_epochs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
