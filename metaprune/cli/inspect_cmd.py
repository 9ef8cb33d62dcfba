"""`metaprune inspect`: layers, coupled channel groups, MACs, parameters and graph size of a model.

Examples::

    metaprune inspect model.pt2
    metaprune inspect model.safetensors --json
    metaprune inspect --family resnet --config '{"depth": 56}' --input-shape 3 32 32
"""

import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect", help="show a model's layers, coupled groups, MACs, parameters and graph size"
    )
    parser.add_argument(
        "input", nargs="?", metavar="INPUT",
        help="model file (.pt2, or .safetensors with its spec .json beside it)",
    )
    parser.add_argument("--family", help="inspect a fresh zoo model of this family instead")
    parser.add_argument("--config", default="{}", help="zoo config as JSON (with --family)")
    parser.add_argument(
        "--input-shape", type=int, nargs="+", metavar="N",
        help="per-sample input shape for --family, e.g. 3 32 32",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead")
    parser.set_defaults(handler=run)


def _load(args):
    from metaprune.errors import ModelFormatError

    if (args.input is None) == (args.family is None):
        raise ModelFormatError("give either a model file INPUT or --family (not both)")
    if args.input is not None:
        from metaprune.formats import load_model

        return args.input, *load_model(args.input)
    from metaprune import zoo

    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as error:
        raise ModelFormatError(f"--config is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ModelFormatError("--config must be a JSON object")
    if args.input_shape:
        config["input_shape"] = args.input_shape
    model = zoo.build(args.family, config)
    full = zoo.config_of(args.family, model)  # every key, input_shape included
    return f"zoo:{args.family}", model, zoo.example_inputs(full, batch=1)


def _coupled_groups(model, example_inputs) -> tuple[list[dict], str | None]:
    """Channel groups as the pruner sees them (torch-pruning's DependencyGraph, or the channel
    graph's coupling for attention, tied weights and grouped convolutions)."""
    try:
        from metaprune.pruning.graph_groups import plan_channel_groups

        _, groups = plan_channel_groups(model, example_inputs)
    except Exception as error:  # noqa: BLE001 - a tracing failure is reported, not fatal
        return [], f"the pruner could not group this model: {type(error).__name__}: {error}"
    found = []
    for group in groups:
        members = sorted({use.unit for use in group.uses if use.side == "out"})
        consumers = sorted({use.unit for use in group.uses if use.side == "in"})
        found.append({
            "root": group.root, "channels": group.size, "layers": members,
            "consumers": consumers, "blocked": group.blocked,
        })
    return found, None


def describe(model, example_inputs) -> dict:
    """Everything `inspect` reports, as a JSON-serialisable dict."""
    from metaprune.graph import to_graph
    from metaprune.measure import count_macs, count_params

    graph = to_graph(model, example_inputs)
    parameters = dict(model.named_parameters())
    layers = []
    for layer in graph.layers:
        # parameters carried by the layer's nodes and edges (folded norms included)
        params = sum(parameters[name].numel() for name in layer.params if name in parameters)
        layers.append({
            "name": layer.name, "kind": layer.kind, "type": layer.module_type,
            "channels": layer.num_nodes, "kernel": layer.kernel_numel,
            "inputs": [graph.layer_dag.nodes[p]["name"]
                       for p in graph.layer_dag.predecessors(graph.layers.index(layer))],
            "folded_norms": list(layer.norms), "params": params,
        })
    groups, groups_note = _coupled_groups(model, example_inputs)
    return {
        "params": count_params(model),
        "macs": count_macs(model, example_inputs),
        "graph": {
            "nodes": graph.num_nodes,
            "edges": graph.num_edges,
            "edge_features": graph.data.edge_attr.numel(),
            "edge_groups": {
                str(k): int(n) for k, n in zip(graph.data.edge_group_k.tolist(),
                                               graph.data.edge_group_size.tolist())
            },
        },
        "layers": layers,
        "coupled_groups": groups,
        "graph_coupled_layers": graph.coupled_layers(),
        "notes": graph.notes + ([groups_note] if groups_note else []),
        "side_parameters": sorted(graph.side_parameters),
    }


def _print_text(source: str, report: dict) -> None:
    g = report["graph"]
    print(f"model: {source}")
    print(f"parameters: {report['params']:,}   MACs (batch 1): {report['macs']:,}")
    groups = ", ".join(f"k={k}: {n:,}" for k, n in g["edge_groups"].items())
    print(f"graph: {g['nodes']:,} nodes, {g['edges']:,} edges ({groups}), "
          f"{g['edge_features']:,} edge feature values")
    print(f"\nlayers ({len(report['layers'])}):")
    width = max([len(layer["name"]) for layer in report["layers"]] + [4])
    type_width = max([len(layer["type"]) for layer in report["layers"]] + [4])
    print(f"  {'name':<{width}}  {'kind':<14} {'type':<{type_width}} {'chan':>6} {'k':>4} "
          f"{'params':>10}  inputs / folded norms")
    for layer in report["layers"]:
        extra = ", ".join(layer["inputs"])
        if layer["folded_norms"]:
            extra += f"  [norm: {', '.join(layer['folded_norms'])}]"
        print(f"  {layer['name']:<{width}}  {layer['kind']:<14} {layer['type']:<{type_width}} "
              f"{layer['channels']:>6} {layer['kernel']:>4} {layer['params']:>10,}  {extra}")
    print(f"\ncoupled groups ({len(report['coupled_groups'])}, torch-pruning):")
    for group in report["coupled_groups"]:
        state = f"  BLOCKED: {group['blocked']}" if group["blocked"] else ""
        print(f"  {group['root']} [{group['channels']} ch]: {', '.join(group['layers'])}{state}")
    coupled = [names for names in report["graph_coupled_layers"] if len(names) > 1]
    print(f"\nlayers whose channels the graph couples ({len(coupled)} groups of 2+):")
    for names in coupled:
        print(f"  {', '.join(names)}")
    if report["side_parameters"]:
        print(f"\nside store (not graph features): {', '.join(report['side_parameters'])}")
    for note in report["notes"]:
        print(f"note: {note}")


def run(args) -> int:
    source, model, example_inputs = _load(args)
    report = describe(model, example_inputs)
    if args.json:
        print(json.dumps({"model": source, **report}, indent=2))
    else:
        _print_text(source, report)
    return 0
