"""`metaprune prune INPUT --out OUTPUT ...`: prune a model file in-process or on a server."""

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prune", help="prune a model file to a speed-up or params target",
        description="Remove whole channels of INPUT (.pt2, or .safetensors + spec) until it meets "
                    "the target, then write OUTPUT (.pt2, .safetensors, .onnx), a JSON report "
                    "and a per-layer sparsity chart beside it.",
    )
    parser.add_argument("input", help="model file (.pt2, or .safetensors with its .json spec)")
    parser.add_argument("--out", required=True, help="pruned model file (.pt2, .safetensors, .onnx)")
    parser.add_argument("--method", default="l2",
                        help="metanet or a criterion: l1, l2, bn_scale, taylor, hessian, lamp, "
                             "fpgm, random (default l2)")
    parser.add_argument("--criterion", help="criterion used with --method metanet")
    parser.add_argument("--metanet", help="metanetwork checkpoint (default: the committed one)")
    parser.add_argument("--allocation", default="global", choices=("global", "uniform", "metanet"),
                        help="how channels are shared out between layers (default global)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--speedup", type=float, help="MACs before / MACs after, e.g. 2.0")
    target.add_argument("--params-ratio", type=float, help="params after / params before, e.g. 0.5")
    parser.add_argument("--policy", help="JSON file: module name -> keep ratio")
    parser.add_argument("--dataset", help="dataset id (mnist1d, digits, fashion-mnist, cifar10) or "
                                          "folder; enables accuracy figures and fine-tuning")
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="fine-tuning epochs in all (needs --dataset); with --method "
                        "metanet half follow the rewrite, the rest follow pruning")
    parser.add_argument("--report", help="report JSON path (default: OUTPUT with .report.json)")
    parser.add_argument("--server", help="HOST:PORT of a MetaPrune server: prune there instead")
    parser.add_argument("--token", help="bearer token for --server")
    parser.add_argument("--tls-ca", help="CA certificate for a TLS --server")
    parser.set_defaults(handler=_run)


def _options(args: argparse.Namespace) -> dict:
    """The `metaprune.prune` keywords the arguments ask for (defaults left out)."""
    options = {"method": args.method, "allocation": args.allocation,
               "finetune_epochs": args.finetune_epochs}
    for key in ("criterion", "metanet", "speedup", "params_ratio", "policy"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    if args.dataset is not None:
        options["data"] = args.dataset
    return options


def _report_path(args) -> Path:
    out = Path(args.out)
    return Path(args.report) if args.report else out.with_name(out.stem + ".report.json")


def _run(args) -> int:
    from metaprune.errors import MetaPruneError

    if not Path(args.input).is_file():
        raise MetaPruneError(f"input model {args.input!r} does not exist")
    report_path = _report_path(args)
    if args.server:
        report = _run_remote(args, report_path)
    else:
        report = _run_local(args, report_path)
    from metaprune.report import format_summary, plot_sparsity, write_report

    write_report(report, report_path)
    chart = plot_sparsity(report, report_path.with_name(Path(args.out).stem + ".sparsity.png"))
    print(format_summary(report))
    print(f"wrote {args.out}, {report_path}, {chart}")
    return 0


def _run_local(args, report_path: Path) -> dict:
    from metaprune.formats import load_model, save_model
    from metaprune.pruning import prune

    module, example_inputs = load_model(args.input)
    result = prune(module, example_inputs, **_options(args))
    save_model(result.model, example_inputs, args.out)
    return result.report


def _run_remote(args, report_path: Path) -> dict:
    from metaprune.errors import MetaPruneError

    try:
        from metaprune.serving.client import prune_remote
    except ImportError as error:
        raise MetaPruneError(
            f"--server needs the MetaPrune service client, which is not installed ({error})"
        ) from error
    return prune_remote(args.server, args.input, args.out, token=args.token, tls_ca=args.tls_ca,
                        options=_options(args), report_path=report_path, progress=True)
