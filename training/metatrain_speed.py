"""Meta-training steps/s of the metanetwork's two formulations, on one small corpus.

`metaprune bench metanet-scale --metatrain` runs this in its own process (``python -m
metaprune.training.metatrain_speed``) and reports the JSON it prints: the same `meta_loss`
(task + group lasso + pruned loss) and AdamW steps, the metanetwork's forward once on edge
lists (`metaprune.metanet.scatter_reference`, the formulation before edge grids) and once on
edge grids (`MetaNetwork.forward`); and the "linear" message kind (`linear_messages`, same width
and rounds) with its own AdamW.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from torch import nn

from metaprune.metanet import MetaNetwork
from metaprune.metanet.scatter_reference import scatter_forward

from .corpus import build_model
from .corpus_plan import plan_corpus
from .metatrain_tasks import CorpusTasks, meta_loss


class EdgeListMetanet(nn.Module):
    """The metanetwork's forward as it was before the grid formulation (same parameters)."""

    def __init__(self, metanet: MetaNetwork):
        super().__init__()
        self.metanet = metanet

    def forward(self, graph, speedup=None):
        return scatter_forward(self.metanet, graph.data, speedup)


def measure(steps: int = 6, repeats: int = 3) -> dict:
    """Meta-training steps/s, edge-list (before) and grid (after) forward.

    A corpus of 4 small mnist1d models (cnn1d, mlp; one epoch each) is built in a temporary
    folder; both formulations run the same `meta_loss` (task + group lasso + pruned loss) and
    AdamW steps on the same metanetwork settings as the committed checkpoint.
    """
    with tempfile.TemporaryDirectory(prefix="metanet-scale-corpus-") as folder:
        for task in plan_corpus(["cnn1d", "mlp"], ["mnist1d"], count=4, epochs=1, seed=0,
                                held_out_every=100):
            build_model(task, folder)
        tasks = CorpusTasks(folder, batch_size=64)
        torch.manual_seed(0)
        metanet = MetaNetwork(hidden=32, num_layers=3, gate_range=3.0).train()
        linear = MetaNetwork(hidden=32, num_layers=3, gate_range=3.0, message="linear").train()
        optimizers = {id(net): torch.optim.AdamW(net.parameters(), lr=1e-3)
                      for net in (metanet, linear)}
        ids, speedups = tasks.train_ids, (1.5, 2.0, 3.0)

        def run_steps(forward, count):
            optimizer = optimizers[id(getattr(forward, "metanet", forward))]
            began = time.perf_counter()
            for step in range(count):
                loss = meta_loss(forward, tasks, ids[step % len(ids)], speedups[step % 3],
                                 lam=0.1, prune_weight=1.0)[0]
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            return count / (time.perf_counter() - began)

        forwards = {"before": EdgeListMetanet(metanet), "after": metanet, "linear": linear}
        for forward in forwards.values():
            run_steps(forward, len(ids))  # warm-up: every task loaded, every graph built
        rates = {label: [] for label in forwards}
        for _ in range(repeats):  # alternated, so a busy spell of the machine hits both
            for label, forward in forwards.items():
                rates[label].append(run_steps(forward, steps))
        params = [tasks.meta[i]["params"] for i in ids]
    return {"models": len(ids), "model_params": params, "steps": steps,
            "before_steps_per_s": statistics.median(rates["before"]),
            "after_steps_per_s": statistics.median(rates["after"]),
            "linear_steps_per_s": statistics.median(rates["linear"]), "runs": rates}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--steps", type=int, default=6, help="steps per timed run (default 6)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(measure(steps=args.steps)))


if __name__ == "__main__":
    main()
