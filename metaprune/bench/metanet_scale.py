"""The metanetwork at real model sizes: `transform()` seconds and peak memory beside torch-pruning.

For each checkpoint of `--metanets` (message kind "mlp" or "linear"), each model (ResNet-56 at
32², a ResNet-50 at 224², a ViT-B/16 at 224² with ``nn.MultiheadAttention``) and each
`--precision` ("mlp" only), one fresh process (`measure_transform`)
builds the model, times `to_graph` and `write_back`, then the anchor (torch-pruning's
``DependencyGraph().build_dependency`` plus one forward/backward, median of 3), the whole
`transform(model, inputs)` of the shipped checkpoint with its weight rewrite switched back on
(`rewrite_switched_on`: every round of message passing, decoding, write-back), the anchor again,
and the shipped checkpoint's own `transform` (a copy: its rewrite is off). The ratio divides by
the mean of the two anchors, timed in the same minutes as the transform. VmHWM excludes the
anchor (the peak is reset before the transform). With bf16 among the precisions,
`measure_precision_error` compares bf16's rewrite with fp32's on `--error-models`.

The ratio full transform / anchor is the figure that travels between machines; seconds per million
parameters tells whether the cost is linear in size. `--metatrain` adds meta-training steps/s
(`python -m metaprune.training.metatrain_speed`: the edge-list formulation of before, kept as
`metaprune.metanet.scatter_reference`, against the grid one and the linear message kind; median
of 3), and `--prune` a
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
        for mine, new in zip(metanet.rewrite_layers()[:-1], fresh.rewrite_layers()[:-1]):
            mine.weight.copy_(new.weight)
            mine.bias.copy_(new.bias)
        metanet.rewrite_gain.fill_(1.0)  # a fresh network's gain starts at 0 (the identity)
    return LoadedMetanet(metanet, loaded.document)


def _anchor(model, inputs, repeats: int) -> dict:
    """torch-pruning's DependencyGraph build + one forward/backward: the median of `repeats`
    runs, wall and CPU seconds."""
    import torch_pruning as tp

    times, cpu_times = [], []
    for _ in range(repeats):
        began, cpu = time.perf_counter(), time.process_time()
        tp.DependencyGraph().build_dependency(model, example_inputs=inputs)
        model(*inputs).sum().backward()
        times.append(time.perf_counter() - began)
        cpu_times.append(time.process_time() - cpu)
        model.zero_grad(set_to_none=True)
    return {"s": statistics.median(times), "cpu_s": statistics.median(cpu_times),
            "runs": times, "cpu_runs": cpu_times}


def measure_transform(name: str, precision: str = "fp32", anchor_repeats: int = 3,
                      checkpoint: str = "default") -> dict:
    """Child process: one model's figures, the anchor timed in the same process around the
    transform, so both see the same minutes of load. `checkpoint` is the metanetwork measured
    (a name for `load_metanet` or a path).

    In order: build the model; time `to_graph` and `write_back`; the anchor (`_anchor`); the
    whole `transform(model, inputs)` of the shipped checkpoint with its rewrite switched on
    (`rewrite_switched_on`), per-edge work in `precision`; the anchor again; the shipped
    checkpoint's own `transform` (a copy: its rewrite is off); its `layer_keep_ratios` at 2x
    (what every `prune(method="metanet")` pays: graph, message passing, head, group policy).
    The peak resident set is reset
    (``/proc/self/clear_refs``) after the first anchor, so VmHWM is the larger of the peak
    while building the model and converting it, and the peak from the transform's start (the
    model and what the anchor left resident included): the anchor's backward never sets it.
    """
    import gc

    import torch

    import metaprune
    from metaprune.bench.graph import _reset_peak
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
    build_peak = _vmhwm_mib()
    before = _anchor(model, inputs, anchor_repeats)
    shipped = metaprune.load_metanet(checkpoint)
    metanet = rewrite_switched_on(shipped)
    metanet.precision = precision
    gc.collect()
    if not _reset_peak():
        raise OSError("cannot reset VmHWM (/proc/self/clear_refs): the anchor would set it")
    began, cpu = time.perf_counter(), time.process_time()
    rewritten = metanet.transform(model, inputs)
    transform_s, transform_cpu_s = time.perf_counter() - began, time.process_time() - cpu
    transform_peak = _vmhwm_mib()
    after = _anchor(model, inputs, anchor_repeats)
    began = time.perf_counter()
    shipped.transform(model, inputs)
    shipped_s = time.perf_counter() - began
    began, cpu = time.perf_counter(), time.process_time()
    shipped.layer_keep_ratios(model, inputs, speedup=2.0)
    keep_s, keep_cpu_s = time.perf_counter() - began, time.process_time() - cpu
    with torch.no_grad():
        before_out, after_out = model(*inputs), rewritten(*inputs)
    change = float((after_out - before_out).norm() / before_out.norm())
    return {"model": name, "precision": precision, "checkpoint": checkpoint,
            "message": metanet.metanet.message, "params": params, "nodes": nodes,
            "edges": edges, "to_graph_s": to_graph_s, "write_back_s": write_back_s,
            "transform_s": transform_s, "transform_cpu_s": transform_cpu_s,
            "anchor_before": before, "anchor_after": after,
            "anchor_s": (before["s"] + after["s"]) / 2,
            "anchor_cpu_s": (before["cpu_s"] + after["cpu_s"]) / 2,
            "shipped_transform_s": shipped_s, "keep_ratios_s": keep_s,
            "keep_ratios_cpu_s": keep_cpu_s, "rewrites": metanet.rewrites_weights,
            "vmhwm_mib": max(build_peak, transform_peak), "build_vmhwm_mib": build_peak,
            "transform_vmhwm_mib": transform_peak, "output_change": change}


def measure_precision_error(name: str) -> dict:
    """Child process: how far bf16 per-edge work moves the full transform from fp32's.

    The same graph through the rewrite-on network (`rewrite_switched_on`) with
    ``precision="fp32"`` and ``"bf16"``: the rewritten weights' |bf16 - fp32| relative to
    their layer's weight RMS (max) and to the weights' mean |w| (mean), the rewrite's own
    error (|Δdelta| / |delta| in norm, delta = new - old), the keep ratios of every layer
    (the shipped checkpoint's sparsity head, which the rewrite does not change), and the
    rewritten models' outputs.
    """
    import torch

    import metaprune
    from metaprune.graph import to_graph
    from metaprune.metanet.grids import GraphView

    model, inputs = build(name)
    graph = to_graph(model, inputs)
    metanet = rewrite_switched_on(metaprune.load_metanet("default")).metanet
    results, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        metanet.precision = precision
        began = time.process_time()
        with torch.no_grad():
            results[precision] = metanet(graph)
        seconds[precision] = time.process_time() - began
    (x32, w32, keep32), (x16, w16, keep16) = results["fp32"], results["bf16"]
    old = graph.features.edge_attr
    layer_rms = torch.zeros_like(old)
    for grid in GraphView.of(graph).grids:
        if grid.k:
            piece = grid.attr(old)
            grid.attr(layer_rms).fill_(float(piece.square().mean().sqrt()))
    error = (w16 - w32).abs()
    weighted = layer_rms > 0
    with torch.no_grad():
        out32 = graph.write_back(x32, w32)(*inputs)
        out16 = graph.write_back(x16, w16)(*inputs)
        out = model(*inputs)
    return {"model": name, "edges": graph.num_edges, "cpu_s": seconds,
            "weights_max_rel_to_layer_rms":
                float((error[weighted] / layer_rms[weighted]).max()),
            "weights_mean_rel": float(error.sum() / w32.abs().sum()),
            "delta_rel_norm": float((w16 - w32).norm() / (w32 - old).norm()),
            "nodes_max_abs": float((x16 - x32).abs().max()),
            "keep_max_abs": float((keep16 - keep32).abs().max()),
            "keep_mean_abs": float((keep16 - keep32).abs().mean()),
            "output_rel_to_rewrite": float((out16 - out32).norm() / (out32 - out).norm())}


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
    choice = (report.get("metanet") or {}).get("allocation_choice") or {}
    return {"wall_s": time.perf_counter() - began, "seconds": report["seconds"],
            "choice": {"chosen": choice.get("candidate"),
                       "measured": choice.get("measured")},
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
    parser.add_argument("--metanets", nargs="+", default=["default"], metavar="CKPT",
                        help="checkpoints to measure, rows each (names for load_metanet or "
                             "paths; default: default). A linear-kind checkpoint gets fp32 rows "
                             "only: --precision does not apply to it")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="models to measure (default: all three)")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16", "auto"),
                        default=["fp32", "bf16"],
                        help="per-edge precisions of the full transform, a row each "
                             "(default: fp32 bf16)")
    parser.add_argument("--error-models", nargs="*", choices=MODELS,
                        default=["resnet56", "resnet50"],
                        help="models on which bf16's rewrite is compared with fp32's (two more "
                             "full passes each; default: resnet56 resnet50)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of every measuring process (default 1)")
    parser.add_argument("--metatrain", action="store_true",
                        help="also measure meta-training steps/s, edge list vs grids")
    parser.add_argument("--prune", action="store_true",
                        help="also run prune(method='metanet') on the ResNet-50 (64 samples)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"page to write (default {OUT})")


def _row(figures: dict) -> tuple[str, dict]:
    """A table row of `measure_transform`'s figures, and the ratios it derives."""
    before, after = figures["anchor_before"], figures["anchor_after"]
    derived = {"ratio": figures["transform_s"] / figures["anchor_s"],
               "cpu_ratio": figures["transform_cpu_s"] / figures["anchor_cpu_s"],
               "seconds_per_million": figures["transform_cpu_s"] / (figures["params"] / 1e6),
               "shipped_ratio": figures["shipped_transform_s"] / figures["anchor_s"]}
    row = (f"| {figures['checkpoint']} ({figures['message']}) | {figures['model']} "
           f"| {figures['precision']} | {figures['params']:,} "
           f"| {figures['edges']:,} | {figures['to_graph_s']:.2f} | {figures['write_back_s']:.2f} "
           f"| {figures['transform_s']:.2f} ({figures['transform_cpu_s']:.2f}) "
           f"| {before['s']:.2f} ({before['cpu_s']:.2f}) | {after['s']:.2f} ({after['cpu_s']:.2f}) "
           f"| {derived['ratio']:.1f}x | {derived['cpu_ratio']:.1f}x "
           f"| {derived['seconds_per_million']:.2f} | {figures['vmhwm_mib']:,.0f} "
           f"| {figures['shipped_transform_s']:.2f} | {derived['shipped_ratio']:.2f}x "
           f"| {figures['keep_ratios_s']:.2f} ({figures['keep_ratios_cpu_s']:.2f}) |")
    return row, derived


def _precisions(checkpoint: str, precisions: list[str]) -> list[str]:
    """The precisions a checkpoint is measured at: all for the "mlp" kind, fp32 for "linear"
    (its per-edge work ignores the setting)."""
    from metaprune.metanet import load_metanet

    return precisions if load_metanet(checkpoint).metanet.message == "mlp" else ["fp32"]


def _key(checkpoint: str, name: str, precision: str) -> str:
    """The figures' key of a row: the default checkpoint's keep the names of before."""
    key = name if precision == "fp32" else f"{name}/{precision}"
    return key if checkpoint == "default" else f"{checkpoint}:{key}"


def run(args) -> int:
    lines = [
        "Each row comes from one fresh process. **full transform** is the whole "
        "`LoadedMetanet.transform(model, inputs)` call (to_graph + every round of message "
        "passing + decoding + write_back) of the shipped checkpoint with its weight rewrite "
        "switched back on (decoders' last layers reset to a fresh metanetwork's, "
        "`rewrite_switched_on`: same architecture, same cost), its per-edge work in the row's "
        "**precision** (`LoadedMetanet.precision`; node terms, aggregations across chunks, "
        "LayerNorm statistics and the rewritten weights stay fp32). The ratios and s per M "
        "params are of this call.",
        "Anchor: torch-pruning `DependencyGraph().build_dependency` + one forward/backward of the "
        "same model, median of 3, timed in the same process right **before** and right "
        "**after** the transform; the ratios divide by the mean of the two. VmHWM: the larger "
        "of the process's peak resident set while building and converting the model, and its "
        "peak from the transform's start (reset through /proc/self/clear_refs after the first "
        "anchor, so the anchor's backward never sets it; the model is resident throughout).",
        "**shipped transform** is `metaprune.load_metanet(CKPT).transform(model, inputs)` of "
        "the row's checkpoint as shipped, in the same process: its rewrite is off (head-only or "
        "untrained rewrite), so `transform` returns a copy without running the metanetwork.",
        f"torch threads per process: {args.threads}. The machine (2 cores) was shared with other "
        "jobs (other engineers' tests and benches) while this ran: compare the ratios, not the "
        "seconds; the CPU-time ratios (process CPU seconds of the same calls) are the steadier "
        "figure. s per M params is of CPU seconds.",
        "",
        "**metanet** is the checkpoint measured and its message kind: `mlp` (an MLP on every "
        "edge, `metaprune.metanet.layers`) or `linear` (messages linear in the weights, a matmul "
        "per weight block, `metaprune.metanet.linear_messages`; its per-edge work is always in "
        "the network's dtype, so it gets fp32 rows only). **keep ratios s** is the checkpoint's "
        "`layer_keep_ratios(model, inputs, speedup=2.0)`, what every `prune(method=\"metanet\")` "
        "pays (graph, message passing, head, group policy).",
        "",
        "| metanet | model | precision | params | edges | to_graph s | write_back s "
        "| full transform s (CPU s) | anchor before s (CPU s) | anchor after s (CPU s) "
        "| full / anchor, wall | full / anchor, CPU | s per M params | VmHWM MiB "
        "| shipped transform s | shipped / anchor | keep ratios s (CPU s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    figures = {}
    measured = [(checkpoint, precision) for checkpoint in args.metanets
                for precision in _precisions(checkpoint, args.precision)]
    for checkpoint, precision in measured:
        for name in args.models:
            key = _key(checkpoint, name, precision)
            result = _child(f"measure_transform({name!r}, {precision!r}, "
                            f"checkpoint={checkpoint!r})", args.threads)
            figures[key] = result
            if "error" in result:
                row = f"| {checkpoint} | {name} | {precision} | failed: {result['error']} |"
            else:
                row, derived = _row(result)
                result.update(derived)
            lines.append(row)
            print(row, flush=True)
    for checkpoint, precision in measured:
        per_million = [figures.get(_key(checkpoint, n, precision), {})
                       .get("seconds_per_million") for n in ("resnet50", "vit_b16")]
        if all(per_million):
            line = (f"\nCPU seconds per million parameters ({checkpoint}, {precision} full "
                    f"transform), max / min over ResNet-50 and ViT-B/16: "
                    f"{max(per_million) / min(per_million):.2f}")
            lines.append(line)
            print(line, flush=True)
    for precision in args.precision:
        pairs = [(n, figures.get(n, {}), figures.get(f"{n}/{precision}", {}))
                 for n in args.models]
        if precision == "fp32" or not all("ratio" in a and "ratio" in b for _, a, b in pairs):
            continue
        speedups = ", ".join(f"{n} {fp32['transform_cpu_s'] / other['transform_cpu_s']:.2f}x"
                             for n, fp32, other in pairs)
        line = f"\n{precision} speed-up of the full transform over fp32 (CPU seconds): {speedups}"
        lines.append(line)
        print(line, flush=True)
    if args.error_models and "bf16" in args.precision:
        header = ("\nbf16 against fp32, the same graph through the rewrite-on network "
                  "(`measure_precision_error`): rewritten weights |Δ| (max relative to the "
                  "layer's weight RMS; mean relative to mean |w|), the rewrite's own error "
                  "(norm of Δ over the norm of new - old), keep ratios |Δ| (every graph layer), "
                  "and the rewritten models' outputs (norm of Δ over the norm of the rewrite's "
                  "change of the output).\n\n"
                  "| model | edges | fp32 CPU s | bf16 CPU s | weights max | weights mean "
                  "| rewrite | keep max | keep mean | output |\n"
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        lines.append(header)
        print(header, flush=True)
        for name in args.error_models:
            error = _child(f"measure_precision_error({name!r})", args.threads)
            figures[f"{name}/error"] = error
            row = (f"| {name} | failed: {error['error']} |" if "error" in error else
                   f"| {name} | {error['edges']:,} | {error['cpu_s']['fp32']:.2f} "
                   f"| {error['cpu_s']['bf16']:.2f} | {error['weights_max_rel_to_layer_rms']:.1e} "
                   f"| {error['weights_mean_rel']:.1e} | {error['delta_rel_norm']:.1e} "
                   f"| {error['keep_max_abs']:.1e} | {error['keep_mean_abs']:.1e} "
                   f"| {error['output_rel_to_rewrite']:.1e} |")
            lines.append(row)
            print(row, flush=True)
    if args.metatrain:
        # the pipeline runs in its own process: metaprune/ never imports metaprune.training
        rates = _run_json([sys.executable, "-m", "metaprune.training.metatrain_speed",
                           "--threads", str(args.threads)])
        figures["metatrain"] = rates
        line = ("\nmeta-training steps/s (median of 3 runs of "
                f"{rates.get('steps')} steps; {rates.get('models')} mnist1d corpus models of "
                f"{rates.get('model_params')} parameters): edge list (before) "
                f"{rates.get('before_steps_per_s', float('nan')):.2f}, grids (after) "
                f"{rates.get('after_steps_per_s', float('nan')):.2f}, linear message kind "
                f"{rates.get('linear_steps_per_s', float('nan')):.2f}"
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
                + "; allocation choice: " + json.dumps(result.get("choice"))
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
