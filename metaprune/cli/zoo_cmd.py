"""`metaprune zoo list|show`: the parametric model families and their default configs.

(`metaprune zoo build`, the corpus pipeline, is registered by the training side.)
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
