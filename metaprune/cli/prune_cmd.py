"""`metaprune prune INPUT --out OUTPUT ...`: prune a model file in-process or on a server."""

import argparse
from pathlib import Path

from metaprune.vocabulary import (
    ALLOCATIONS,
    CRITERIA,
    DATASETS,
    METHODS,
    TEXT_DATASETS,
    PruneRequest,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prune", help="prune a model file to a speed-up or params target",
        description="Remove whole channels of INPUT (.pt2, or .safetensors + spec) until it meets "
                    "the target, then write OUTPUT (.pt2, .safetensors, .onnx), a JSON report "
                    "and a per-layer sparsity chart beside it.",
    )
    parser.add_argument("input", help="model file (.pt2, or .safetensors with its .json spec)")
    parser.add_argument("--out", required=True, help="pruned model file (.pt2, .safetensors, .onnx)")
    parser.add_argument("--method", default="l2", choices=METHODS, metavar="NAME",
                        help=f"metanet or a criterion: {', '.join(CRITERIA)} (default l2)")
    parser.add_argument("--criterion", choices=CRITERIA, metavar="NAME",
                        help="criterion used with --method metanet")
    parser.add_argument("--metanet", help="metanetwork checkpoint (default: the committed one)")
    parser.add_argument("--allocation", default="global", choices=ALLOCATIONS,
                        help="how channels are shared out between layers (default global)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--speedup", type=float, help="MACs before / MACs after (> 1), e.g. 2.0")
    target.add_argument("--params-ratio", type=float,
                        help="params after / params before, in (0, 1), e.g. 0.5")
    target.add_argument("--latency-speedup", type=float,
                        help="latency before / after at --latency-batch (> 1)")
    parser.add_argument("--policy", help="JSON file: module name -> keep ratio, or a recipe "
                                         "written by `metaprune tune`")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="NAME",
                        help="module names left unpruned (each with its submodules)")
    parser.add_argument("--latency-batch", type=int, default=1,
                        help="batch size of every latency measurement and of "
                             "--latency-speedup (default 1)")
    parser.add_argument("--no-latency", dest="latency", action="store_false",
                        help="skip the report's latency measurement")
    parser.add_argument("--round-to", help="kept channel counts become multiples of N (an "
                                           "integer, or auto: the multiple this CPU rewards), "
                                           "for any target")
    parser.add_argument("--dataset", help=f"dataset id ({', '.join(DATASETS)}), text corpus "
                                          f"({', '.join(TEXT_DATASETS)}: perplexity in the "
                                          "report) or folder; enables accuracy figures and "
                                          "fine-tuning")
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="fine-tuning epochs in all (needs --dataset); with --method "
                        "metanet half follow the rewrite, the rest follow pruning")
    parser.add_argument("--report", help="report JSON path (default: OUTPUT with .report.json)")
    parser.add_argument("--server", help="HOST:PORT of a MetaPrune server: prune there instead")
    parser.add_argument("--token", help="bearer token for --server")
    parser.add_argument("--tls-ca", help="CA certificate for a TLS --server")
    parser.set_defaults(handler=_run)


def request_of(args: argparse.Namespace) -> PruneRequest:
    """The checked request the arguments ask for (a bad value fails here, before any work)."""
    return PruneRequest(
        method=args.method, criterion=args.criterion, metanet=args.metanet,
        allocation=args.allocation, speedup=args.speedup, params_ratio=args.params_ratio,
        latency_speedup=args.latency_speedup, latency_batch=args.latency_batch,
        round_to=args.round_to, latency=args.latency, exclude=tuple(args.exclude),
        policy=args.policy, data=args.dataset, finetune_epochs=args.finetune_epochs)


def _report_path(args) -> Path:
    out = Path(args.out)
    return Path(args.report) if args.report else out.with_name(out.stem + ".report.json")


def _run(args) -> int:
    from metaprune.errors import MetaPruneError

    hf_folder = (Path(args.input) / "config.json").is_file()  # a HuggingFace folder
    if not (Path(args.input).is_file() or hf_folder):
        raise MetaPruneError(f"input model {args.input!r} does not exist")
    report_path = _report_path(args)
    request = request_of(args)
    if args.server:
        report = _run_remote(args, request, report_path)
    else:
        report = _run_local(args, request)
    from metaprune.report import format_summary, plot_sparsity, write_report

    write_report(report, report_path)
    chart = plot_sparsity(report, report_path.with_name(Path(args.out).stem + ".sparsity.png"))
    print(format_summary(report))
    print(f"wrote {args.out}, {report_path}, {chart}")
    return 0


def _show_latency_progress() -> None:
    """Latency measurement and latency-target attempts as lines on stderr (they take seconds)."""
    import logging

    log = logging.getLogger("metaprune.latency")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _run_local(args, request: PruneRequest) -> dict:
    from metaprune.formats import load_model, save_model
    from metaprune.pruning import prune_request

    _show_latency_progress()

    module, example_inputs = load_model(args.input)
    result = prune_request(module, example_inputs, request)
    save_model(result.model, example_inputs, args.out)
    return result.report


def _run_remote(args, request: PruneRequest, report_path: Path) -> dict:
    from metaprune.errors import MetaPruneError

    try:
        from metaprune.serving.client import prune_remote
    except ImportError as error:
        raise MetaPruneError(
            f"--server needs the MetaPrune service client, which is not installed ({error})"
        ) from error
    return prune_remote(args.server, args.input, args.out, token=args.token, tls_ca=args.tls_ca,
                        request=request, report_path=report_path, progress=True)
