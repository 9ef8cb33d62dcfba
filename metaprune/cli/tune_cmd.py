"""`metaprune tune INPUT --dataset NAME --speedup X ...`: search a per-layer policy with Ray Tune.

The pipeline lives in `metaprune.training.tune`, imported only inside the handler (it imports
Ray).
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tune", help="search per-layer keep ratios for a speed-up target with Ray Tune",
        description="Search one keep ratio per prunable channel group of INPUT: each trial "
                    "prunes (l2) to the speed-up target, fine-tunes and reports its test "
                    "accuracy after every epoch. Writes recipe.json (the best policy meeting "
                    "the target; `metaprune prune --policy recipe.json` applies it), "
                    "trials.json, trials.csv and trials.png (accuracy vs MACs, Pareto front) "
                    "to --out.",
    )
    parser.add_argument("input", help="model file (.pt2, or .safetensors with its .json spec)")
    parser.add_argument("--dataset", required=True,
                        help="dataset id the trials fine-tune and evaluate on (e.g. mnist1d)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--speedup", type=float,
                        help="MACs before / MACs after every trial reaches, e.g. 2.0")
    target.add_argument("--latency-speedup", type=float,
                        help="measured latency before / after every trial reaches (at "
                             "--latency-batch; trials take turns timing), e.g. 2.0")
    parser.add_argument("--latency-batch", type=int, default=1,
                        help="batch of the latency measurements of --latency-speedup "
                             "(default 1)")
    parser.add_argument("--samples", type=int, default=16, help="trials in all (default 16)")
    parser.add_argument("--scheduler", choices=("asha",),
                        help="asha: stop weak trials early on their per-epoch accuracy "
                             "(default: every trial runs every epoch)")
    parser.add_argument("--search", choices=("random", "optuna"), default="random",
                        help="how policies are proposed (default random; optuna: TPE, "
                             "multi-objective with acc,flops)")
    parser.add_argument("--objectives", default="acc",
                        help="acc, or acc,flops to search the speed-up too and trade accuracy "
                             "against MACs (default acc)")
    parser.add_argument("--finetune-epochs", type=int, default=1,
                        help="fine-tuning epochs per trial, each reported (default 1)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the search's draws (trials use the data seed of "
                             "`metaprune prune`, so a recipe reproduces its trial)")
    parser.add_argument("--workers", type=int, default=2,
                        help="CPUs of the local Ray cluster, one trial per CPU (default 2)")
    parser.add_argument("--ray-address",
                        help="join this Ray cluster instead of a local one; a cluster with "
                             "token authentication takes the token from RAY_AUTH_TOKEN, "
                             "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (token mode is turned "
                             "on when one is found; RAY_AUTH_MODE=disabled opts out)")
    parser.add_argument("--out", default="tune-out", metavar="DIR",
                        help="folder for the recipe, trials and figure (default ./tune-out)")
    parser.set_defaults(handler=_run)


def _run(args) -> int:
    # The one place the pipeline (and Ray) is imported, so `metaprune --help` stays light.
    from metaprune.training.tune import TuneSettings, format_summary, run_search

    settings = TuneSettings(
        model=args.input, dataset=args.dataset,
        speedup=args.speedup if args.latency_speedup is None else args.latency_speedup,
        target_kind="speedup" if args.latency_speedup is None else "latency_speedup",
        latency_batch=args.latency_batch, samples=args.samples,
        scheduler=args.scheduler, search=args.search,
        objectives=tuple(name.strip() for name in args.objectives.split(",") if name.strip()),
        finetune_epochs=args.finetune_epochs, seed=args.seed, workers=args.workers,
        ray_address=args.ray_address, out_dir=args.out)
    summary = run_search(settings)
    for line in format_summary(summary):
        print(line)
    return 0 if summary["best"] is not None else 1
