"""`prune()`: structured pruning of any traceable model to an exact MACs or params target.

The run, in order: (optional) metanetwork weight rewrite; channel groups from Torch-Pruning's
DependencyGraph; importance of every channel, computed once; per-group removal counts from the
allocation, bisected against the analytic cost model; one physical removal; a real MACs/params
count, and — if the analytic model missed by more than a fraction of the tolerance — a
corrected goal and one more removal from the dense copy; BatchNorm recalibration and
fine-tuning when data is given; the report.
"""

import copy
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from metaprune.criteria import build_criterion
from metaprune.errors import InvalidTargetError, UnsupportedModelError
from metaprune.measure import count_macs, count_params, measure_latency_ms
from metaprune.pruning import training_bridge
from metaprune.pruning.allocation import (
    global_allocation,
    policy_allocation,
    policy_to_groups,
    removal_order,
    uniform_allocation,
)
from metaprune.pruning.cost import CostModel
from metaprune.pruning.graph_groups import attention_heads, plan_channel_groups
from metaprune.pruning.metanet_bridge import apply_metanet, load_metanet
from metaprune.pruning.options import PruneOptions, resolve_options
from metaprune.pruning.removal import (
    block_breaking_groups,
    check_pruned,
    forward_outputs,
    remove_channels,
)
from metaprune.pruning.targets import TOLERANCE, solve_counts
from metaprune.report import build_report

# Aim well inside the 2 % tolerance so rounding in the real count never tips a result over.
_RECOUNT_TOLERANCE = TOLERANCE / 4
_MAX_CORRECTIONS = 3


@dataclass
class PruneResult:
    """What `prune` returns.

    Attributes:
        model: the pruned module (a new object; the input is left untouched).
        report: JSON-serialisable figures, see `metaprune.report.build_report`.
    """

    model: nn.Module
    report: dict


class _Timer:
    """Seconds per phase, for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _kept_channels(before: nn.Module, after: nn.Module) -> dict[str, list[int]]:
    """Module name -> [kept, total] output channels of every conv, Linear and attention layer."""
    def width(module):
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.out_channels
        if isinstance(module, nn.Linear):
            return module.out_features
        if isinstance(module, nn.MultiheadAttention):
            return module.embed_dim
        return None

    after_modules = dict(after.named_modules())
    # attention's own projections follow its embedding width: reported once, as the attention
    attention = tuple(f"{name}." for name, m in before.named_modules()
                      if isinstance(m, nn.MultiheadAttention))
    kept = {}
    for name, module in before.named_modules():
        total = width(module)
        if total is None or name not in after_modules or (attention and name.startswith(attention)):
            continue
        kept[name] = [int(width(after_modules[name])), int(total)]
    return kept


def _plan(work: nn.Module, example_inputs, settings: PruneOptions, criterion, loaders, timer):
    """Groups, removal orders, ranking keys and the cost model of the dense model `work`."""
    with timer.phase("graph"):
        DG, groups = plan_channel_groups(work, example_inputs)
    if not any(g.blocked is None for g in groups):
        raise UnsupportedModelError("the model has no prunable channel group (every group reaches "
                                    "the output or holds a layer that cannot be pruned)")
    with timer.phase("score"):
        if criterion.needs_data:
            criterion.prepare(work, loaders[0])
        orders, keys = [], []
        for group in groups:
            if group.blocked:
                scores = None
            elif group.plan is not None:  # a group read from the channel graph
                scores = group.plan.score(group, criterion, work)
            else:
                scores = criterion(group.dependency_group)
            if scores is None:
                scores = torch.zeros(group.size)
                if not group.blocked:
                    group.blocked = f"criterion {criterion.name!r} cannot score it"
            order, group_keys = removal_order(group, scores)
            orders.append(order)
            keys.append(group_keys)
            group.dependency_group = None  # frees the traced graph once scored
        work.zero_grad(set_to_none=True)
    with timer.phase("allocate"):
        cost = CostModel(work, example_inputs, DG, groups)
        cost.set_orders(orders)
    return groups, orders, keys, cost


def _allocation(work: nn.Module, settings: PruneOptions, groups, keys, policy_ratios_from_metanet):
    """The allocation family the target is bisected over (built after groups are final)."""
    names = {name for name, _ in work.named_modules()}
    policy = policy_ratios_from_metanet or settings.policy
    if policy is not None:
        return policy_allocation(groups, keys, policy_to_groups(policy, groups, names))
    if settings.allocation == "uniform":
        return uniform_allocation(groups, keys)
    return global_allocation(groups, keys)


def _prune_to_target(work, example_inputs, settings, groups, orders, cost, allocation, timer):
    """Physically pruned model whose real MACs/params meet the target (or the policy as is)."""
    reference_shapes = [tuple(t.shape) for t in forward_outputs(work, example_inputs)]
    target = settings.target
    if target is None:
        with timer.phase("prune"):
            pruned = remove_channels(work, example_inputs, groups, orders, allocation.counts(1.0))
            check_pruned(pruned, example_inputs, reference_shapes)
        return pruned
    goal = target.goal(cost)
    best, best_miss = None, float("inf")
    for _ in range(_MAX_CORRECTIONS + 1):
        with timer.phase("allocate"):
            counts = solve_counts(allocation, cost, target, goal)
            predicted = cost.evaluate(counts)[0 if target.kind == "speedup" else 1]
        with timer.phase("prune"):
            pruned = remove_channels(work, example_inputs, groups, orders, counts)
            check_pruned(pruned, example_inputs, reference_shapes)
        with timer.phase("verify"):
            real = count_macs(pruned, example_inputs) if target.kind == "speedup" \
                else count_params(pruned)
        miss = abs(real / target.goal(cost) - 1.0)
        if miss < best_miss:
            best, best_miss = pruned, miss
        if miss <= _RECOUNT_TOLERANCE:
            break
        # The analytic model is off by real/predicted here; ask it for proportionally less.
        goal = target.goal(cost) * predicted / real
    achieved = target.achieved(cost.macs_before, count_macs(best, example_inputs),
                               cost.params_before, count_params(best))
    if target.error(achieved) > TOLERANCE:
        raise InvalidTargetError(
            f"{target.kind} {target.value:g} cannot be met within {TOLERANCE:.0%}: the closest "
            f"channel counts give {achieved:.4g} (the model's layers are too narrow for a finer step)"
        )
    return best


def prune(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    method: str = "l2",
    criterion: str | None = None,
    metanet=None,
    allocation="global",
    speedup: float | None = None,
    params_ratio: float | None = None,
    policy=None,
    data=None,
    finetune_epochs: int = 0,
    finetune: dict | None = None,
) -> PruneResult:
    """Prunes whole channels of `module` to a MACs or params target.

    Args:
        module: the network (left untouched; the result is a pruned deep copy).
        example_inputs: a tuple of input tensors for one forward pass.
        method: `"metanet"` or a criterion id; `"metanet"` implies `metanet="default"`,
            `allocation="metanet"`, `criterion="l2"` unless those are given.
        criterion: one of `l1`, `l2`, `bn_scale`, `taylor`, `hessian`, `lamp`, `fpgm`, `random`
            (`taylor` and `hessian` need `data`).
        metanet: None, `"default"`, a checkpoint path, or a loaded metanetwork.
        allocation: `"global"` (normalised importance ranked across layers, each layer keeps at
            least 10 %), `"uniform"`, `"metanet"` (the sparsity head's keep ratios; `"global"`
            when the checkpoint's head is untrained), or a policy (dict or JSON path).
        speedup: MACs before / MACs after to reach (within 2 %).
        params_ratio: params after / params before to reach (within 2 %); not with `speedup`.
        policy: module name -> keep ratio (dict or JSON path); applied as is without a target,
            rescaled to the target with one.
        data: a dataset id, a folder, or a `(train_loader, test_loader)` pair; enables
            accuracy figures, gradient criteria, BN recalibration and fine-tuning.
        finetune_epochs: epochs of fine-tuning in all (needs `data`). Without a metanetwork
            they all follow pruning; with one they are split: ``finetune["metanet_epochs"]``
            (default half, rounded down) right after the rewrite, the rest after pruning.
        finetune: fine-tune settings (`optimizer`, `lr`, `schedule`, `distill`,
            `bn_recalibration`).

    Example::

        import torch, metaprune
        from metaprune.zoo import build, default_config
        model = build("resnet", default_config("resnet", input_shape=(3, 32, 32), num_classes=10))
        example_inputs = (torch.randn(1, 3, 32, 32),)
        result = metaprune.prune(model, example_inputs, method="l2", speedup=2.0)
        result.report["speedup"]      # 2.0 ± 2 %
        result.model(*example_inputs)  # runs, with fewer channels
    """
    timer = _Timer()
    settings = resolve_options(method, criterion, metanet, allocation, speedup, params_ratio, policy,
                         data)
    finetune_epochs = int(finetune_epochs or 0)
    if finetune_epochs < 0:
        raise InvalidTargetError(f"finetune_epochs must be >= 0, got {finetune_epochs}")
    if finetune is not None or data is not None:
        training_bridge.finetune_config(finetune)
    # a lone tensor is one input, not a sequence of rows
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) \
        else tuple(example_inputs)
    chosen = build_criterion(settings.criterion)
    with timer.phase("load"):
        metanet_object = load_metanet(settings.metanet)
        loaders = training_bridge.resolve_data(data)
    was_training = module.training
    work = copy.deepcopy(module)
    with timer.phase("measure"):
        flops_before, params_before = count_macs(work, example_inputs), count_params(work)
        latency_before = measure_latency_ms(work, example_inputs, batch=64)
    with timer.phase("evaluate"):
        accuracy_before = training_bridge.evaluate(work, loaders[1]) if loaders else None
    policy_from_metanet = None
    after_metanet = training_bridge.metanet_epochs(finetune_epochs, finetune) \
        if metanet_object is not None else 0
    after_prune = finetune_epochs - after_metanet
    finetune_record = {"epochs_after_metanet": 0, "epochs_after_prune": 0, "history": []}
    allocation_used = settings.allocation
    if metanet_object is not None:
        with timer.phase("metanet"):
            work, policy_from_metanet = apply_metanet(
                metanet_object, work, example_inputs, speedup=speedup, params_ratio=params_ratio)
            if settings.allocation != "metanet":
                policy_from_metanet = None
            elif policy_from_metanet is None:
                allocation_used = "global"  # the metanetwork's sparsity head is not trained
        if after_metanet:
            with timer.phase("finetune"):
                finetune_record["history"] += training_bridge.finetune(
                    work, loaders[0], epochs=after_metanet, config=finetune,
                    eval_loader=loaders[1], teacher=module)
            finetune_record["epochs_after_metanet"] = after_metanet
    groups, orders, keys, cost = _plan(work, example_inputs, settings, chosen, loaders, timer)
    try:
        with timer.phase("allocate"):
            allocation_plan = _allocation(work, settings, groups, keys, policy_from_metanet)
        pruned = _prune_to_target(work, example_inputs, settings, groups, orders, cost,
                                  allocation_plan, timer)
    except UnsupportedModelError:
        with timer.phase("probe"):
            if not block_breaking_groups(work, example_inputs, groups, orders) or \
                    all(g.blocked for g in groups):
                raise
        with timer.phase("allocate"):
            allocation_plan = _allocation(work, settings, groups, keys, policy_from_metanet)
        pruned = _prune_to_target(work, example_inputs, settings, groups, orders, cost,
                                  allocation_plan, timer)
    skipped_reason = None
    if loaders is None:
        skipped_reason = "no data was given, so the pruned model was not fine-tuned"
    elif after_prune == 0:
        skipped_reason = "finetune_epochs is 0" if finetune_epochs == 0 else \
            "the whole fine-tune budget was spent after the metanetwork"
    if loaders is not None:
        # With 0 epochs this only recalibrates BatchNorm statistics (if the config says so).
        with timer.phase("finetune"):
            finetune_record["history"] += training_bridge.finetune(
                pruned, loaders[0], epochs=after_prune, config=finetune,
                eval_loader=loaders[1] if after_prune else None, teacher=module)
            finetune_record["epochs_after_prune"] = after_prune
    with timer.phase("evaluate"):
        accuracy_after = training_bridge.evaluate(pruned, loaders[1]) if loaders else None
    with timer.phase("measure"):
        flops_after, params_after = count_macs(pruned, example_inputs), count_params(pruned)
        latency_after = measure_latency_ms(pruned, example_inputs, batch=64)
    pruned.train(was_training)
    report = build_report(
        flops_before=flops_before, flops_after=flops_after,
        params_before=params_before, params_after=params_after,
        kept=_kept_channels(module, pruned),
        accuracy_before=accuracy_before, accuracy_after=accuracy_after,
        latency_ms_before=latency_before, latency_ms_after=latency_after,
        finetune=None if skipped_reason and not finetune_record["epochs_after_metanet"]
        else finetune_record,
        finetune_skipped_reason=skipped_reason,
        method=method, criterion=settings.criterion,
        allocation=allocation_used, seconds=timer.seconds,
    )
    return PruneResult(pruned, report)
