"""`metaprune metanet train`: meta-train the metanetwork on a corpus with Ray Train.

The pipeline lives in `metaprune.training.metatrain`, imported only inside the handler.
"""

import json
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("metanet", help="meta-train the metanetwork")
    actions = parser.add_subparsers(dest="metanet_command", metavar="ACTION")
    actions.required = True
    train = actions.add_parser(
        "train",
        help="meta-train on a corpus (Ray Train, data-parallel), keep the best checkpoint",
        description="Train the metanetwork on the corpus's training models (task loss of the "
        "rewritten model + normalised group sparsity), one checkpoint per epoch in the run "
        "folder (resumed when re-run), then validate every checkpoint by a 2x l2 prune and "
        "one fine-tune epoch on held-out models and copy the best to --out.",
    )
    train.add_argument("--corpus", required=True, metavar="DIR", help="the corpus folder")
    train.add_argument("--out", required=True, metavar="CKPT",
                       help="where the best checkpoint goes (.safetensors, + .json beside it)")
    train.add_argument("--run-dir", metavar="DIR",
                       help="metrics, checkpoints and validation results "
                       "(default: CKPT without suffix + '-run')")
    train.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    train.add_argument("--epochs", type=int, default=2, help="total epochs (default 2)")
    train.add_argument("--steps-per-epoch", type=int, default=40,
                       help="steps per epoch on each worker (default 40)")
    train.add_argument("--lam", type=float, default=0.1,
                       help="weight of the normalised group-sparsity term (default 0.1)")
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    train.add_argument("--families", default="", help="comma-separated families (default all)")
    train.add_argument("--datasets", default="", help="comma-separated datasets (default all)")
    train.add_argument("--validate-on", type=int, default=2, metavar="K",
                       help="held-out models used to pick the best checkpoint (default 2)")
    train.add_argument("--ray-address", help="join this Ray cluster instead of a local one")
    train.add_argument("--no-ray", action="store_true",
                       help="train in this process (one worker, no Ray)")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(handler=_train)


def _names(text: str) -> list:
    return [name for name in text.split(",") if name]


def _train(args) -> int:
    from metaprune.training.metatrain import (
        MetaTrainConfig,
        select_best,
        train_locally,
        train_with_ray,
    )
    from metaprune.training.metatrain_tasks import CorpusTasks

    out = Path(args.out)
    run_dir = Path(args.run_dir) if args.run_dir else out.with_name(out.stem + "-run")
    config = MetaTrainConfig(
        corpus=args.corpus, out_dir=str(run_dir), epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch, lr=args.lr, lam=args.lam, seed=args.seed,
        families=_names(args.families), datasets=_names(args.datasets))
    if args.no_ray:
        train_locally(config)
    else:
        train_with_ray(config, workers=args.workers, ray_address=args.ray_address)
    held_out = CorpusTasks(args.corpus, families=config.families,
                           datasets=config.datasets).held_out_ids[:args.validate_on]
    selection = select_best(config, out, model_ids=held_out)
    for record in selection["validated"]:
        print(f"validated {Path(record['checkpoint']).name}: mean accuracy "
              f"{record['score']:.4f} {json.dumps(record['accuracies'])}")
    print(f"best {Path(selection['best']['checkpoint']).name} -> {selection['out']}")
    return 0
