"""The metanetwork at real model sizes: `transform()` seconds and peak memory beside torch-pruning.

For each model (ResNet-56 at 32², a ResNet-50 at 224², a ViT-B/16 at 224² with
``nn.MultiheadAttention``), three fresh processes:

- one builds the model, times `to_graph`, `write_back` and a whole `transform(model, inputs)`
  call of the shipped checkpoint with its weight rewrite switched back on
  (`rewrite_switched_on`: every round of message passing, decoding, write-back), and reports
  its resident-set high-water mark (VmHWM: the whole process's life, model included);
- one times ``metaprune.load_metanet("default").transform(model, inputs)`` as shipped (its
  rewrite is off, so that call is a copy: reported beside, never as the metanetwork's cost);
- one builds the model and times the anchor: torch-pruning's
  ``DependencyGraph().build_dependency`` plus one forward/backward of the model, median of 3.

The ratio full transform / anchor is the figure that travels between machines; seconds per million
parameters tells whether the cost is linear in size. `--metatrain` adds meta-training steps/s
(`python -m metaprune.training.metatrain_speed`: the edge-list formulation of before, kept as
`metaprune.metanet.scatter_reference`, against the grid one; median of 3), and `--prune` a
``prune(method="metanet")`` of the ResNet-50 with 64 random 224² samples. Everything runs on
`--threads` torch threads (default 1: on a shared 2-core machine one thread per process is the
steadiest).
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("resnet56", "resnet50", "vit_b16")
OUT = Path("benchmarks") / "metanet-scale.md"


def build(name: str):
    """(model, example_inputs) of a benchmark model, in eval mode, seeded."""
    import torch

    from metaprune import zoo
    from metaprune.bench import graph

    if name in ("resnet56", "resnet50"):
        return graph.build(name, 224)
    torch.manual_seed(0)
    config = zoo.default_config("vit", input_shape=(3, 224, 224), num_classes=1000,
                                patch_size=16, embed_dim=768,
                                blocks=[{"heads": 12, "mlp": 3072}] * 12)
    return zoo.build("vit", config).eval(), zoo.example_inputs(config, batch=1)


def _vmhwm_mib() -> float:
    from metaprune.bench.graph import _status_kib

    return _status_kib("VmHWM") / 1024


def rewrite_switched_on(loaded):
    """The loaded checkpoint with its weight rewrite on: the decoders' last layers (zeroed in
    the shipped, head-only checkpoint) reset to those of a fresh `MetaNetwork` (seed 0), and
    the rewrite gain set to 1.

    Same architecture, so the same message passing at the same cost; it exists so that the
    bench times the whole metanetwork, which the shipped checkpoint's `transform` skips.
    """
    import copy

    import torch

    from metaprune.metanet import LoadedMetanet, MetaNetwork

    metanet = copy.deepcopy(loaded.metanet)
    torch.manual_seed(0)
    fresh = MetaNetwork(**metanet.config)
    with torch.no_grad():
        for mine, new in ((metanet.node_decoder[-1], fresh.node_decoder[-1]),
                          (metanet.edge_decoder.out[-1], fresh.edge_decoder.out[-1])):
            mine.weight.copy_(new.weight)
            mine.bias.copy_(new.bias)
        metanet.rewrite_gain.fill_(1.0)  # a fresh network's gain starts at 0 (the identity)
    return LoadedMetanet(metanet, loaded.document)


def measure_transform(name: str, rewrite: str = "on") -> dict:
    """Child process: to_graph, write_back and transform() seconds, and the process's VmHWM.

    `rewrite` "on": the whole message passing (`rewrite_switched_on`); "shipped": the
    shipped checkpoint as it is (its rewrite is off, so `transform` is a copy).
    """
    import torch

    import metaprune
    from metaprune.graph import to_graph

    model, inputs = build(name)
    params = sum(p.numel() for p in model.parameters())
    began = time.perf_counter()
    graph = to_graph(model, inputs)
    to_graph_s = time.perf_counter() - began
    began = time.perf_counter()
    graph.write_back()
    write_back_s = time.perf_counter() - began
    edges, nodes = graph.num_edges, graph.num_nodes
    del graph
    metanet = metaprune.load_metanet("default")
    if rewrite == "on":
        metanet = rewrite_switched_on(metanet)
    began, cpu = time.perf_counter(), time.process_time()
    rewritten = metanet.transform(model, inputs)
    transform_s, transform_cpu_s = time.perf_counter() - began, time.process_time() - cpu
    with torch.no_grad():
        before, after = model(*inputs), rewritten(*inputs)
    change = float((after - before).norm() / before.norm())
    return {"model": name, "params": params, "nodes": nodes, "edges": edges,
            "to_graph_s": to_graph_s, "write_back_s": write_back_s, "transform_s": transform_s,
            "transform_cpu_s": transform_cpu_s, "rewrites": metanet.rewrites_weights,
            "vmhwm_mib": _vmhwm_mib(), "output_change": change}


def measure_anchor(name: str, repeats: int = 3) -> dict:
    """Child process: DependencyGraph build + one forward/backward, median of `repeats`."""
    import torch_pruning as tp

    model, inputs = build(name)
    times, cpu_times = [], []
    for _ in range(repeats):
        began, cpu = time.perf_counter(), time.process_time()
        tp.DependencyGraph().build_dependency(model, example_inputs=inputs)
        model(*inputs).sum().backward()
        times.append(time.perf_counter() - began)
        cpu_times.append(time.process_time() - cpu)
        model.zero_grad(set_to_none=True)
    return {"model": name, "anchor_s": statistics.median(times), "anchor_runs": times,
            "anchor_cpu_s": statistics.median(cpu_times), "anchor_cpu_runs": cpu_times}


def measure_prune(samples: int = 64, batch: int = 16) -> dict:
    """Child process: prune(method="metanet") of the ResNet-50 with random 224² data."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import metaprune

    model, inputs = build("resnet50")
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(samples, 3, 224, 224, generator=generator),
                         torch.randint(0, 1000, (samples,), generator=generator))
    loaders = (DataLoader(data, batch_size=batch, shuffle=True, generator=generator),
               DataLoader(data, batch_size=batch))
    began = time.perf_counter()
    result = metaprune.prune(model, inputs, method="metanet", speedup=2.0, data=loaders,
                             finetune_epochs=2, latency=False)
    report = result.report
    return {"wall_s": time.perf_counter() - began, "seconds": report["seconds"],
            "speedup": report["speedup"], "macs_before": report["macs_before"],
            "macs_after": report["macs_after"], "allocation": report["allocation"],
            "vmhwm_mib": _vmhwm_mib(), "samples": samples, "batch": batch}


def _child(call: str, threads: int) -> dict:
    code = ("import json, torch; torch.set_num_threads(%d); "
            "from metaprune.bench import metanet_scale as m; print(json.dumps(m.%s))"
            % (threads, call))
    return _run_json([sys.executable, "-c", code])


def _run_json(command: list[str]) -> dict:
    """The JSON object a child process prints last, or ``{"error": its last stderr line}``."""
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode != 0:
        return {"error": child.stderr.strip().splitlines()[-1] if child.stderr else "failed"}
    return json.loads(child.stdout.strip().splitlines()[-1])


def add_arguments(parser) -> None:
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="models to measure (default: all three)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of every measuring process (default 1)")
    parser.add_argument("--metatrain", action="store_true",
                        help="also measure meta-training steps/s, edge list vs grids")
    parser.add_argument("--prune", action="store_true",
                        help="also run prune(method='metanet') on the ResNet-50 (64 samples)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"page to write (default {OUT})")


def run(args) -> int:
    lines = [
        "Each figure comes from a fresh process. **full transform** is the whole "
        "`LoadedMetanet.transform(model, inputs)` call (to_graph + every round of message "
        "passing + decoding + write_back) of the shipped checkpoint with its weight rewrite "
        "switched back on (decoders' last layers reset to a fresh metanetwork's, "
        "`rewrite_switched_on`: same architecture, same cost); the ratio and s per M params "
        "are of this call. VmHWM is that process's peak resident set, model included.",
        "**shipped transform** is `metaprune.load_metanet(\"default\").transform(model, "
        "inputs)` as shipped: its rewrite is off (head-only checkpoint), so `transform` returns "
        "a copy without running the metanetwork (the weights are the same either way).",
        "Anchor: torch-pruning `DependencyGraph().build_dependency` + one forward/backward of the "
        "same model, in the same run (median of 3).",
        f"torch threads per process: {args.threads}. The machine (2 cores) was shared with other "
        "jobs (3 other engineers' tests and benches) while this ran: compare the ratios to the "
        "same-run anchor, not the seconds. Wall-clock ratios move with the load of the minutes "
        "each process happened to run in; the CPU-time ratios (process CPU seconds of the same "
        "calls) are the steadier figure. s per M params is of CPU seconds.",
        "",
        "| model | params | edges | to_graph s | write_back s | full transform s (CPU s) "
        "| anchor s (CPU s) | full / anchor, wall | full / anchor, CPU | s per M params "
        "| VmHWM MiB | shipped transform s | shipped / anchor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines[:7]), flush=True)
    figures = {}
    for name in args.models:
        transform = _child(f"measure_transform({name!r})", args.threads)
        shipped = _child(f"measure_transform({name!r}, rewrite='shipped')", args.threads)
        anchor = _child(f"measure_anchor({name!r})", args.threads)
        figures[name] = {**transform, **anchor, "shipped": shipped}
        failed = next((part["error"] for part in (transform, shipped, anchor)
                       if "error" in part), None)
        if failed:
            row = f"| {name} | failed: {failed} |"
        else:
            ratio = transform["transform_s"] / anchor["anchor_s"]
            cpu_ratio = transform["transform_cpu_s"] / anchor["anchor_cpu_s"]
            per_million = transform["transform_cpu_s"] / (transform["params"] / 1e6)
            shipped_ratio = shipped["transform_s"] / anchor["anchor_s"]
            figures[name].update(ratio=ratio, cpu_ratio=cpu_ratio,
                                 seconds_per_million=per_million, shipped_ratio=shipped_ratio)
            row = (f"| {name} | {transform['params']:,} | {transform['edges']:,} "
                   f"| {transform['to_graph_s']:.2f} | {transform['write_back_s']:.2f} "
                   f"| {transform['transform_s']:.2f} ({transform['transform_cpu_s']:.2f}) "
                   f"| {anchor['anchor_s']:.2f} ({anchor['anchor_cpu_s']:.2f}) | {ratio:.1f}x "
                   f"| {cpu_ratio:.1f}x | {per_million:.2f} | {transform['vmhwm_mib']:,.0f} "
                   f"| {shipped['transform_s']:.2f} | {shipped_ratio:.2f}x |")
        lines.append(row)
        print(row, flush=True)
    big = [figures[n]["seconds_per_million"] for n in ("resnet50", "vit_b16")
           if "seconds_per_million" in figures.get(n, {})]
    if len(big) == 2:
        line = f"\nCPU seconds per million parameters (full transform), max / min over ResNet-50 " \
               f"and ViT-B/16: " \
               f"{max(big) / min(big):.2f}"
        lines.append(line)
        print(line, flush=True)
    if args.metatrain:
        # the pipeline runs in its own process: metaprune/ never imports metaprune.training
        rates = _run_json([sys.executable, "-m", "metaprune.training.metatrain_speed",
                           "--threads", str(args.threads)])
        figures["metatrain"] = rates
        line = ("\nmeta-training steps/s (median of 3 runs of "
                f"{rates.get('steps')} steps; {rates.get('models')} mnist1d corpus models of "
                f"{rates.get('model_params')} parameters): edge list (before) "
                f"{rates.get('before_steps_per_s', float('nan')):.2f}, grids (after) "
                f"{rates.get('after_steps_per_s', float('nan')):.2f}"
                if "error" not in rates else f"\nmeta-training: failed: {rates['error']}")
        lines.append(line)
        print(line, flush=True)
    if args.prune:
        result = _child("measure_prune()", args.threads)
        figures["prune"] = result
        line = ("\nprune(method=\"metanet\", speedup=2.0, finetune_epochs=2, latency=False) on "
                f"the ResNet-50, {result.get('samples')} random 224² samples, batch "
                f"{result.get('batch')}: {result.get('wall_s', float('nan')):.1f} s, speed-up "
                f"{result.get('speedup', float('nan')):.3f}, VmHWM "
                f"{result.get('vmhwm_mib', float('nan')):,.0f} MiB; phases (s): "
                + json.dumps({k: round(v, 2) for k, v in result.get("seconds", {}).items()})
                if "error" not in result else f"\nprune: failed: {result['error']}")
        lines.append(line)
        print(line, flush=True)
    command = "metaprune bench metanet-scale " + " ".join(
        sys.argv[sys.argv.index("metanet-scale") + 1:] if "metanet-scale" in sys.argv else [])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# metanet-scale\n\nMade by `" + command.strip()
                        + f"` (under `nice -n {os.nice(0)}`).\n\n" + "\n".join(lines)
                        + "\n\n```json\n" + json.dumps(figures, indent=1) + "\n```\n")
    print(f"written {args.out}")
    return 0
