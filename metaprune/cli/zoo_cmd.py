"""`metaprune zoo list|show|build`: the model families, their default configs, and the corpus.

`build` trains the corpus of "data models" for meta-training with Ray
(`metaprune.training.corpus`, imported only inside its handler).
"""

import json

from metaprune.errors import ModelFormatError


def register(subparsers) -> None:
    parser = subparsers.add_parser("zoo", help="list model families, show a default config")
    actions = parser.add_subparsers(dest="zoo_command", metavar="ACTION")
    actions.required = True

    listing = actions.add_parser("list", help="families with their config keys")
    listing.set_defaults(handler=_list)

    show = actions.add_parser(
        "show", help="a family's default config (JSON), parameters and MACs"
    )
    show.add_argument("family", help="family id, e.g. resnet")
    show.add_argument(
        "--input-shape",
        type=int,
        nargs="+",
        metavar="N",
        help="per-sample channel-first shape, e.g. 1 40 or 3 32 32 (default: the family's)",
    )
    show.add_argument("--num-classes", type=int, default=10)
    show.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help='override a config key, e.g. --set depth=32 --set \'stage_widths=[8,16,32]\'',
    )
    show.set_defaults(handler=_show)
    _register_build(actions)


def _register_build(actions) -> None:
    build = actions.add_parser(
        "build",
        help="train a corpus of zoo models with Ray (resumable)",
        description="Train N sampled zoo models (family configs, seeds, recipes) as Ray tasks "
        "and store each as DIR/ID.safetensors + ID.json spec + ID.meta.json, with "
        "DIR/manifest.json. Re-running the same command skips finished models.",
    )
    build.add_argument("--families", default="mlp,cnn1d,resnet,vit",
                       help="comma-separated family ids; each is used for the datasets whose "
                       "input rank it fits (default: %(default)s)")
    build.add_argument("--datasets", default="mnist1d",
                       help="comma-separated dataset ids (default: %(default)s)")
    build.add_argument("--count", type=int, required=True,
                       help="models in all, spread round-robin over (family, dataset) pairs")
    build.add_argument("--out", metavar="DIR",
                       help="the corpus folder (default: $METAPRUNE_CACHE/corpus, i.e. "
                       "~/.cache/metaprune/corpus)")
    build.add_argument("--epochs", type=int, default=6,
                       help="most training epochs; each recipe draws between half and this")
    build.add_argument("--train-subset", type=int, metavar="K",
                       help="train on K samples of each dataset (default: all)")
    build.add_argument("--initial-prune", type=float, metavar="SPEEDUP",
                       help="prune each model ~SPEEDUP times with l2 and fine-tune 1 epoch "
                       "(e.g. 1.3; default: no initial pruning)")
    build.add_argument("--held-out-every", type=int, default=5, metavar="K",
                       help="hold out every K-th model of each pair for evaluation (default 5)")
    build.add_argument("--unseen-held-out", action="store_true",
                       help="give held-out models widths and depths outside the training ranges")
    build.add_argument("--workers", type=int, default=2,
                       help="CPUs of the local Ray cluster (one model per CPU; default 2)")
    build.add_argument("--ray-address", help="join this Ray cluster instead of a local one")
    build.add_argument("--seed", type=int, default=0, help="corpus seed, part of every id")
    build.set_defaults(handler=_build)


def _list(args) -> int:
    from metaprune import zoo

    for family, keys in zoo.families_keys().items():
        print(f"{family:12s} {', '.join(keys)}")
    return 0


def _parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ModelFormatError(f"--set expects KEY=JSON, got {pair!r}")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text  # a bare word such as head=flatten
    return overrides


def _show(args) -> int:
    from metaprune import zoo
    from metaprune.measure import count_macs, count_params

    config = dict(_parse_overrides(args.set))
    if args.input_shape:
        config["input_shape"] = args.input_shape
    config["num_classes"] = args.num_classes
    model = zoo.build(args.family, config)
    full = zoo.config_of(args.family, model)
    # One line per config key: nested width lists stay readable, the whole is still JSON.
    entries = ",\n".join(
        f"    {json.dumps(key)}: {json.dumps(value)}" for key, value in full.items()
    )
    print(f'{{\n  "family": {json.dumps(args.family)},\n  "config": {{\n{entries}\n  }}\n}}')
    macs = count_macs(model, zoo.example_inputs(full, batch=1))
    print(f"params: {count_params(model):,}")
    print(f"MACs:   {macs:,} (batch 1)")
    return 0


def _build(args) -> int:
    # The one place a pipeline is imported: lazily, so `metaprune --help` stays light.
    from metaprune.data import cache_dir
    from metaprune.training.corpus import build_corpus
    from metaprune.training.corpus_plan import plan_corpus

    tasks = plan_corpus(
        [name for name in args.families.split(",") if name],
        [name for name in args.datasets.split(",") if name],
        count=args.count,
        epochs=args.epochs,
        seed=args.seed,
        train_subset=args.train_subset,
        initial_prune=args.initial_prune,
        held_out_every=args.held_out_every,
        unseen_held_out=args.unseen_held_out,
    )
    # The corpus is a cache, not a source file: it lives beside the datasets by default.
    folder = args.out or cache_dir() / "corpus"
    summary = build_corpus(tasks, folder, workers=args.workers, ray_address=args.ray_address)
    return 1 if summary["failed"] else 0
