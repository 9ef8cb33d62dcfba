"""`metaprune metanet train`: meta-train the metanetwork on a corpus with Ray Train.

The pipeline lives in `metaprune.training.metatrain`, imported only inside the handler.
"""

import json
from pathlib import Path

from metaprune.errors import InvalidTargetError


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
    train.add_argument("--prune-weight", type=float, default=1.0,
                       help="weight of the loss with each layer's weakest groups zeroed "
                       "(default 1.0)")
    train.add_argument("--sparse-weight", type=float, default=0.0,
                       help="weight of torch-pruning's sparse-learning penalty on the "
                       "rewritten weights, normalised (default 0)")
    train.add_argument("--distill-weight", type=float, default=0.0,
                       help="weight of the KL to the original model's predictions, the dense "
                       "guard (default 0)")
    train.add_argument("--prune-allocation", choices=("uniform", "global"), default="uniform",
                       help="groups the pruned-network loss drops: each layer's weakest share "
                       "(uniform) or the engine's global ranking (default uniform)")
    train.add_argument("--gate-range", type=float, default=3.0,
                       help="channel gates shrink by up to exp(-R), new runs only (default 3)")
    train.add_argument("--residual-scale", type=float, default=1e-3,
                       help="the metanetwork's delta multiplier, new runs only (default 1e-3)")
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    train.add_argument("--families", default="", help="comma-separated families (default all)")
    train.add_argument("--datasets", default="", help="comma-separated datasets (default all)")
    train.add_argument("--validate-on", type=int, default=2, metavar="K",
                       help="held-out models used to pick the best checkpoint (default 2)")
    train.add_argument("--validation", metavar="DIR",
                       help="corpus folder of validation models: select the checkpoint there "
                       "with the bench protocol on a validation split of their data, instead "
                       "of --validate-on")
    train.add_argument("--ray-address", help="join this Ray cluster instead of a local one")
    train.add_argument("--no-ray", action="store_true",
                       help="train in this process (one worker, no Ray)")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(handler=_train)
    _register_evaluate(actions)
    _register_policy_head(actions)


def _add_held_out_arguments(parser, *, finetune_epochs: int) -> None:
    """The arguments of a comparison on held-out corpus models (evaluate, compare-policies)."""
    parser.add_argument("--corpus", required=True, metavar="DIR", help="the corpus folder")
    parser.add_argument("--models", default="", metavar="IDS",
                        help="comma-separated model ids (default: every held-out model)")
    parser.add_argument("--speedups", default="2,3", help="MACs speed-ups (default 2,3)")
    parser.add_argument("--seeds", default="0,1", help="fine-tune seeds (default 0,1)")
    parser.add_argument("--finetune-epochs", type=int, default=finetune_epochs,
                        help=f"total fine-tune epochs of every method (default {finetune_epochs})")


def _register_evaluate(actions) -> None:
    evaluate = actions.add_parser(
        "evaluate",
        help="on held-out corpus models: what the rewrite changes, and metanet+l2 vs classic",
        description="Evidence on the corpus's held-out models: relative weight change, "
        "accuracy right after a 2x l2 prune (no fine-tune) and the group-norm energy that "
        "prune drops, for the original and the rewritten weights; then metanet + l2 against "
        "classic criteria at each speed-up with the same total fine-tune epochs, mean ± "
        "standard error over models (seeds averaged per model).",
    )
    evaluate.add_argument("--metanet", default="default", metavar="CKPT",
                          help="checkpoint (default: the committed one)")
    _add_held_out_arguments(evaluate, finetune_epochs=4)
    evaluate.add_argument("--criteria", default="l2,bn_scale,l1",
                          help="classic criteria to compare with (default l2,bn_scale,l1)")
    evaluate.add_argument("--skip-comparison", action="store_true",
                          help="only the evidence on the rewrite, no prune + fine-tune table")
    evaluate.add_argument("--skip-evidence", action="store_true",
                          help="only the prune + fine-tune table, no evidence on the rewrite")
    evaluate.add_argument("--out", metavar="FILE", help="write every figure as JSON here")
    evaluate.set_defaults(handler=_evaluate)


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
        prune_weight=args.prune_weight, residual_scale=args.residual_scale,
        sparse_weight=args.sparse_weight, distill_weight=args.distill_weight,
        gate_range=args.gate_range, validation=args.validation,
        prune_allocation=args.prune_allocation,
        families=_names(args.families), datasets=_names(args.datasets))
    if args.no_ray:
        train_locally(config)
    else:
        train_with_ray(config, workers=args.workers, ray_address=args.ray_address)
    held_out = CorpusTasks(args.corpus, families=config.families,
                           datasets=config.datasets).held_out_ids[:args.validate_on]
    selection = select_best(config, out, model_ids=held_out)
    for record in selection["validated"]:
        detail = (f"(null metanetwork {record['null']:.4f}; rewrite alone "
                  f"{100 * record['guard']:+.2f} pts at worst)") if "null" in record \
            else json.dumps(record["accuracies"])
        print(f"validated {Path(record['checkpoint']).name}: mean accuracy "
              f"{record['score']:.4f} {detail}")
    print(f"best {Path(selection['best']['checkpoint']).name} -> {selection['out']}")
    return 0


def _evaluate(args) -> int:
    import statistics

    from metaprune.pruning.metanet_bridge import default_checkpoint
    from metaprune.training.metanet_eval import (
        compare_methods,
        paired_difference,
        summarize_runs,
        transform_evidence,
    )
    from metaprune.training.metatrain_tasks import CorpusTasks

    checkpoint = default_checkpoint() if args.metanet == "default" else Path(args.metanet)
    if checkpoint is None or not Path(checkpoint).is_file():
        raise InvalidTargetError(f"no metanetwork checkpoint at {args.metanet!r}")
    ids = _names(args.models) or CorpusTasks(args.corpus).held_out_ids
    evidence = [] if args.skip_evidence else transform_evidence(checkpoint, args.corpus, ids)
    if evidence:
        _print_evidence(evidence)
    figures = {"checkpoint": str(checkpoint), "evidence": evidence}
    if not args.skip_comparison:
        runs = compare_methods(
            checkpoint, args.corpus, ids,
            speedups=[float(value) for value in _names(args.speedups)],
            seeds=[int(value) for value in _names(args.seeds)],
            finetune_epochs=args.finetune_epochs, criteria=_names(args.criteria))
        table = summarize_runs(runs)
        print(f"accuracy after prune + {args.finetune_epochs} fine-tune epochs "
              "(mean ± s.e. over models):")
        for row in table:
            print(f"  {row['speedup']:g}x  {row['method']:11s} {100 * row['mean']:.2f} ± "
                  f"{100 * row['error']:.2f}  ({row['models']} models, {row['runs']} runs)")
        for speedup in sorted({run["speedup"] for run in runs}):
            mean, error, count = paired_difference(runs, speedup, "metanet+l2", "l2")
            if count:
                print(f"  {speedup:g}x  metanet+l2 - l2, paired per model and seed: "
                      f"{100 * mean:+.2f} ± {100 * error:.2f} points ({count} models)")
        figures.update(runs=runs, table=table,
                       seconds=statistics.fsum(run["seconds"] for run in runs))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    return 0


def _register_policy_head(actions) -> None:
    """labels, train-head, compare-policies, head-only: the sparsity head trained on tuned
    policies."""
    head_only = actions.add_parser(
        "head-only", help="a checkpoint with its weight rewrite switched off (exact identity)",
        description="Copy --metanet to --out with the rewrite switched off (its decoders' last "
        "layers zeroed): transform() returns the model unchanged, the sparsity head still "
        "allocates.")
    head_only.add_argument("--metanet", required=True, metavar="CKPT")
    head_only.add_argument("--out", required=True, metavar="CKPT")
    head_only.set_defaults(handler=_head_only)
    init = actions.add_parser(
        "init", help="a fresh (untrained) metanetwork checkpoint, e.g. to train a head on",
        description="Write a seeded, untrained MetaNetwork: its rewrite is exactly the identity "
        "(rewrite gain 0) and its head untrained; `train-head` then trains the head on it.")
    init.add_argument("--out", required=True, metavar="CKPT",
                      help="the checkpoint (.safetensors, + .json beside it)")
    init.add_argument("--message", choices=("mlp", "linear"), default="linear",
                      help="message kind (default linear: messages linear in the weights)")
    init.add_argument("--hidden", type=int, default=32, help="embedding width (default 32)")
    init.add_argument("--rounds", type=int, default=3, help="message rounds (default 3)")
    init.add_argument("--gate-range", type=float, default=3.0,
                      help="channel gates shrink by up to exp(-R) (default 3)")
    init.add_argument("--seed", type=int, default=0, help="torch seed of the weights")
    init.set_defaults(handler=_init)
    labels = actions.add_parser(
        "labels", help="tuned policies of corpus training models: the sparsity head's labels",
        description="Run the Ray Tune policy search on corpus training models at each speed-up "
        "and write the best policy of each as MODEL@Sx.json in --out (with the search's wall "
        "time); finished labels are skipped when re-run.")
    labels.add_argument("--corpus", required=True, metavar="DIR", help="the corpus folder")
    labels.add_argument("--out", required=True, metavar="DIR", help="the label folder")
    labels.add_argument("--speedups", default="2,3", help="MACs speed-ups (default 2,3)")
    labels.add_argument("--samples", type=int, default=8, help="trials per search (default 8)")
    labels.add_argument("--finetune-epochs", type=int, default=1,
                        help="fine-tune epochs per trial (default 1)")
    labels.add_argument("--models", type=int, metavar="K",
                        help="label at most K training models, interleaved across families "
                        "(default all)")
    labels.add_argument("--families", default="", help="comma-separated families (default all)")
    labels.add_argument("--datasets", default="", help="comma-separated datasets (default all)")
    labels.add_argument("--workers", type=int, default=2,
                        help="CPUs of the local Ray, one trial per CPU (default 2)")
    labels.set_defaults(handler=_labels)
    damage = actions.add_parser(
        "damage-labels", help="measured per-group damage of corpus training models: labels "
        "for the sparsity head",
        description="For every corpus training model, prune each channel group alone by each "
        "fraction (the engine's criterion), re-estimate BatchNorm on 8 training batches and "
        "read the loss increase on 4 others (forward passes only); write the allocation with "
        "the least summed damage at each speed-up as MODEL@Sx.json in --out, in the format "
        "train-head reads. Models whose labels exist are skipped when re-run.")
    damage.add_argument("--corpus", required=True, metavar="DIR", help="the corpus folder")
    damage.add_argument("--out", required=True, metavar="DIR", help="the label folder")
    damage.add_argument("--speedups", default="2,3,4", help="MACs speed-ups (default 2,3,4)")
    damage.add_argument("--fractions", default="0.125,0.25,0.375,0.5,0.625,0.75,0.875",
                        help="shares of a group's channels removed, one try each "
                        "(default eighths)")
    damage.add_argument("--criterion", default="l2", help="criterion ordering a group's "
                        "channels (default l2, the metanet path's)")
    damage.add_argument("--models", type=int, metavar="K",
                        help="measure at most K training models (default all)")
    damage.set_defaults(handler=_damage_labels)

    head = actions.add_parser(
        "train-head", help="train only the sparsity head of a checkpoint on policy labels",
        description="Freeze the metanetwork except its sparsity head and train the head to "
        "predict the labels' per-layer allocation (scale-invariant: the engine rescales it to "
        "the target) on the metanet-rewritten models, conditioned on the speed-up; save a "
        "checkpoint marked sparsity_head_trained, which method='metanet' then allocates with.")
    head.add_argument("--metanet", required=True, metavar="CKPT", help="checkpoint to start from")
    head.add_argument("--labels", required=True, metavar="DIR", help="the label folder")
    head.add_argument("--corpus", required=True, metavar="DIR", help="the corpus folder")
    head.add_argument("--out", required=True, metavar="CKPT",
                      help="the new checkpoint (.safetensors, + .json beside it)")
    head.add_argument("--epochs", type=int, default=300, help="passes over the labels "
                      "(default 300)")
    head.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    head.add_argument("--top-k", type=int, default=1,
                      help="target: mean allocation of each search's k best trials (default 1)")
    head.add_argument("--validate-on", type=int, default=0, metavar="K",
                      help="keep K labelled models out of training to measure generalisation")
    head.add_argument("--heads", type=int, default=1, metavar="N",
                      help="train N heads independently and save their mean (one head N times "
                           "as wide; default 1)")
    head.set_defaults(handler=_train_head)

    compare = actions.add_parser(
        "compare-policies",
        help="on held-out models: uniform, global, tuned and predicted allocation, with compute",
        description="At each speed-up and seed, prune every held-out model with l2 and the "
        "same fine-tune epochs under uniform, global, tuned (a Ray Tune search on that model) "
        "and predicted (the sparsity head, on the original weights; and method=metanet) "
        "allocation; print accuracy mean ± s.e. over models and the prune-time seconds of "
        "each allocation decision.")
    compare.add_argument("--metanet", required=True, metavar="CKPT",
                         help="checkpoint with a trained sparsity head")
    _add_held_out_arguments(compare, finetune_epochs=2)
    compare.add_argument("--samples", type=int, default=8,
                         help="trials of each tuned search (default 8)")
    compare.add_argument("--search-finetune-epochs", type=int, default=1,
                         help="fine-tune epochs per search trial (default 1)")
    compare.add_argument("--workers", type=int, default=1,
                         help="CPUs of the searches' local Ray (default 1)")
    compare.add_argument("--out", default="compare-out", metavar="DIR",
                         help="runs.jsonl (resumed when re-run), searches/, table.json")
    compare.set_defaults(handler=_compare_policies)


def _labels(args) -> int:
    from metaprune.training.policy_labels import LabelSettings, build_labels

    summary = build_labels(LabelSettings(
        corpus=args.corpus, out_dir=args.out,
        speedups=tuple(float(value) for value in _names(args.speedups)), samples=args.samples,
        finetune_epochs=args.finetune_epochs, max_models=args.models,
        families=tuple(_names(args.families)), datasets=tuple(_names(args.datasets)),
        workers=args.workers))
    print(f"{summary['written']} labels written, {summary['skipped']} already there, "
          f"{summary['without_policy']} without a policy meeting the target; "
          f"{summary['seconds']} s now, {summary['search_seconds']} s of searches in all")
    return 0


def _damage_labels(args) -> int:
    from metaprune.training.damage_labels import DamageSettings, build_damage_labels

    summary = build_damage_labels(DamageSettings(
        corpus=args.corpus, out_dir=args.out,
        speedups=tuple(float(value) for value in _names(args.speedups)),
        fractions=tuple(float(value) for value in _names(args.fractions)),
        criterion=args.criterion, max_models=args.models))
    print(f"{summary['written']} labels written, {summary['skipped']} already there; "
          f"{summary['seconds']} s")
    return 0


def _train_head(args) -> int:
    from metaprune.training.head_train import HeadTrainSettings, train_head

    summary = train_head(HeadTrainSettings(
        metanet=args.metanet, labels=args.labels, corpus=args.corpus, out=args.out,
        epochs=args.epochs, lr=args.lr, top_k=args.top_k, validate_on=args.validate_on,
        heads=args.heads))
    print(f"{summary['examples']} labels on {summary['train_models']} models: shape loss "
          f"{summary['shape_loss_before']:.4f} -> {summary['shape_loss_after']:.4f} (uniform "
          f"allocation {summary['uniform_loss']:.4f}), {summary['seconds']} s")
    if summary["validation_models"]:
        print(f"validation ({len(summary['validation_models'])} models): "
              f"{summary['validation_loss_before']:.4f} -> "
              f"{summary['validation_loss_after']:.4f} (uniform "
              f"{summary['validation_uniform_loss']:.4f})")
    print(f"wrote {summary['out']}")
    return 0


def _compare_policies(args) -> int:
    from metaprune.metanet import load_metanet
    from metaprune.training.policy_eval import (
        PolicyComparison,
        compare_policies,
        format_table,
        policy_table,
    )

    settings = PolicyComparison(
        corpus=args.corpus, metanet=args.metanet, model_ids=_names(args.models),
        speedups=tuple(float(value) for value in _names(args.speedups)),
        seeds=tuple(int(value) for value in _names(args.seeds)),
        finetune_epochs=args.finetune_epochs, samples=args.samples,
        search_finetune_epochs=args.search_finetune_epochs, workers=args.workers,
        out_dir=args.out)
    table = policy_table(compare_policies(settings))
    one_off = load_metanet(args.metanet).training_metadata.get("head_training")
    for line in format_table(table, one_off):
        print(line)
    (Path(args.out) / "table.json").write_text(
        json.dumps({"table": table, "head_training": one_off}, indent=1) + "\n")
    return 0


def _print_evidence(evidence: list) -> None:
    from metaprune.training.metanet_eval import mean_and_error

    print("model                       change  acc  acc'  pruned  pruned'  dropped  dropped'")
    for row in evidence:
        print(f"{row['model']:27s} {row['relative_change']:.3f}  {row['accuracy']:.3f} "
              f"{row['accuracy_rewritten']:.3f}  {row['pruned_accuracy']:.3f}   "
              f"{row['pruned_accuracy_rewritten']:.3f}    {row['dropped_energy']:.3f}    "
              f"{row['dropped_energy_rewritten']:.3f}")
    for key in ("relative_change", "pruned_accuracy", "pruned_accuracy_rewritten",
                "dropped_energy", "dropped_energy_rewritten"):
        mean, error = mean_and_error([row[key] for row in evidence])
        print(f"mean {key}: {mean:.4f} ± {error:.4f}")


def _init(args) -> int:
    import torch

    from metaprune.metanet import MetaNetwork, save_metanet

    torch.manual_seed(args.seed)
    metanet = MetaNetwork(hidden=args.hidden, num_layers=args.rounds, message=args.message,
                          gate_range=args.gate_range)
    save_metanet(metanet, args.out, training={
        "backbone": f"untrained (torch seed {args.seed}, `metaprune metanet init`)",
        "rewrite": "off: untrained (rewrite gain 0, exact identity)"})
    print(f"wrote {args.out} ({args.message} messages, {metanet.num_parameters} parameters)")
    return 0


def _head_only(args) -> int:
    from metaprune.training.head_train import head_only_checkpoint

    head_only_checkpoint(args.metanet, args.out)
    print(f"wrote {args.out} (rewrite off, sparsity head kept)")
    return 0
