"""`prune()`: structured pruning of any traceable model to a MACs, params or latency target.

`prune` checks its keywords into a `PruneRequest` (torch-free, shared with the CLI, the
service and `tune`) and hands it to `prune_request`, which runs these named steps of a `_Run`:

1. `prepare`: check the fine-tune settings, load the metanetwork and the data (samples adapted
   to the model's input shape by size-1 dimensions only), check `exclude` names — all before
   any work;
2. `measure_dense`: MACs, params and accuracy of the dense model;
3. `rewrite_with_metanet`: the metanetwork's weight rewrite (+ its share of fine-tuning);
4. `plan`: channel groups from Torch-Pruning's DependencyGraph, importance of every channel
   (computed once), the analytic cost model, `round_to` applied to the groups;
5. `prune_to_target`: the one retry loop — allocate, remove, count for real; a miss beyond a
   fraction of the tolerance asks the cost model for proportionally less, and a removal that
   breaks a block's shapes blocks the groups responsible and tries again. A latency target
   instead asks the measured latency model, times the result and corrects
   (`latency_target`);
6. `finetune_pruned`: BatchNorm recalibration and fine-tuning when data is given;
7. `measure_pruned` (dense and pruned latency timed together, interleaved) and `report`.
"""

import copy
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

import metaprune
from metaprune.criteria import build_criterion
from metaprune.errors import InvalidTargetError, UnsupportedModelError
from metaprune.formats.hf import save_pretrained_note
from metaprune.measure import count_macs, count_params
from metaprune.pruning import training_bridge
from metaprune.pruning.allocation import (
    global_allocation,
    policy_allocation,
    policy_to_groups,
    removal_order,
    uniform_allocation,
)
from metaprune.pruning.latency_choice import choose_latency_allocation
from metaprune.pruning.cost import CostModel
from metaprune.pruning.depth import DisconnectedError, check_connected, mark_emptiable
from metaprune.pruning.empty_layers import EmptyConv
from metaprune.pruning.latency_cost import latency_allocation
from metaprune.pruning.latency_target import LatencySettings, LatencySteps
from metaprune.pruning.graph_groups import attention_heads, plan_channel_groups
from metaprune.pruning.metanet_bridge import apply_metanet
from metaprune.pruning.damage import (
    FRACTIONS,
    MEASUREMENT_BUDGET_S,
    MeasurementOverBudget,
    cached_measurement,
    check_measurement_budget,
    damage_policy,
    fingerprint,
    measure_damage,
)
from metaprune.pruning.metanet_choice import (
    blended_policy,
    calibration_and_scoring,
    candidates_for,
    choose_candidate,
    recalibrated_loss,
    uniform_prior,
)
from metaprune.pruning.removal import (
    block_breaking_groups,
    check_pruned,
    forward_outputs,
    remove_channels,
)
from metaprune.pruning.targets import TOLERANCE, Target, solve_counts
from metaprune.report import build_report
from metaprune.vocabulary import TEXT_DATASETS, PruneRequest

# Aim well inside the 2 % tolerance so rounding in the real count never tips a result over.
_RECOUNT_TOLERANCE = TOLERANCE / 4
_MAX_CORRECTIONS = 3


@dataclass
class PruneResult:
    """What `prune` returns.

    Attributes:
        model: the pruned module (a new object; the input is left untouched).
        report: JSON-serialisable figures, see `metaprune.report.schema`.
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
        if isinstance(module, (nn.modules.conv._ConvNd, EmptyConv)):
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


def _in_excluded(unit: str, excluded: tuple[str, ...]) -> bool:
    return any(unit == name or unit.startswith(name + ".") for name in excluded)


class _Run:
    """One pruning run: the request, the models and the figures, step by step."""

    def __init__(self, module: nn.Module, example_inputs, request: PruneRequest) -> None:
        self.module = module  # the caller's model, never modified
        # a lone tensor is one input, not a sequence of rows
        self.example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) \
            else tuple(example_inputs)
        self.request = request
        self.timer = _Timer()
        self.target = Target(*request.target) if request.target is not None else None
        self.allocation_used = request.resolved_allocation
        self.figures: dict = {}  # report values gathered along the way
        self.finetune_record = {"epochs_after_metanet": 0, "epochs_after_prune": 0,
                                "history": []}
        self.policy_from_metanet = None  # the sparsity head's answer (module -> keep ratio)
        self.metanet_ratios = None  # per group, the keep ratio `metanet_choice` chose
        self.latency_steps = LatencySteps(LatencySettings(batch=request.latency_batch),
                                          request.round_to, measure=request.latency)

    # 1 --------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Everything that can fail on the request, checked before any work."""
        request = self.request
        if request.finetune is not None or request.data is not None:
            training_bridge.finetune_config(request.finetune)
        names = {name for name, _ in self.module.named_modules()}
        unknown = [name for name in request.exclude if name not in names]
        if unknown:
            raise InvalidTargetError(f"exclude names module {unknown[0]!r}, which the model does "
                                     "not have")
        self.criterion = build_criterion(request.resolved_criterion)
        with self.timer.phase("load"):
            self.metanet, self.metanet_entry = None, None
            if request.resolved_metanet is not None:
                # imported here: the metanetwork package pulls in torch-geometric (~3 s), which
                # a classic-criterion prune never needs
                from metaprune.metanet import load_metanet
                from metaprune.metanet.scope import select_metanet

                # the checkpoint whose scope fits this model and data, and the report's entry
                chosen, self.metanet_entry = select_metanet(request.resolved_metanet,
                                                            self.module, request.data)
                self.metanet = load_metanet(chosen)
            self.loaders, self.figures["input_adaptation"] = training_bridge.resolve_data(
                request.data, self.example_inputs, model=self.module)
            # a text corpus: perplexity beside the (per-token) accuracy
            self.text = isinstance(request.data, str) and request.data in TEXT_DATASETS
            if self.text:
                self.figures["perplexity_objective"] = training_bridge.text_objective(
                    self.module)
        finetune_epochs = request.finetune_epochs
        self.after_metanet = training_bridge.metanet_epochs(finetune_epochs, request.finetune) \
            if self.metanet is not None else 0
        self.after_prune = finetune_epochs - self.after_metanet

    # 2 --------------------------------------------------------------------------------------
    def measure_dense(self) -> None:
        self.work = copy.deepcopy(self.module)
        with self.timer.phase("measure"):
            self.figures["macs_before"] = count_macs(self.work, self.example_inputs)
            self.figures["params_before"] = count_params(self.work)
        with self.timer.phase("evaluate"):
            self.figures["accuracy_before"] = training_bridge.evaluate(
                self.work, self.loaders[1]) if self.loaders else None
            if self.text:
                self.figures["perplexity_before"] = training_bridge.perplexity(
                    self.work, self.loaders[1])

    # 3 --------------------------------------------------------------------------------------
    def rewrite_with_metanet(self) -> None:
        if self.metanet is None:
            return
        request = self.request
        with self.timer.phase("metanet"):
            self.work, self.policy_from_metanet = apply_metanet(
                self.metanet, self.work, self.example_inputs, speedup=request.speedup,
                params_ratio=request.params_ratio)
            if request.resolved_allocation != "metanet":
                self.policy_from_metanet = None
            elif self.policy_from_metanet is None:
                self.allocation_used = "global"  # the metanetwork's sparsity head is untrained
        if self.after_metanet:
            with self.timer.phase("finetune"):
                self.finetune_record["history"] += training_bridge.finetune(
                    self.work, self.loaders[0], epochs=self.after_metanet,
                    config=request.finetune, eval_loader=self.loaders[1], teacher=self.module)
            self.finetune_record["epochs_after_metanet"] = self.after_metanet

    # 4 --------------------------------------------------------------------------------------
    def plan(self) -> None:
        """Groups, removal orders, ranking keys and the cost model of the dense model."""
        work, timer, criterion = self.work, self.timer, self.criterion
        with timer.phase("graph"):
            DG, groups = plan_channel_groups(work, self.example_inputs)
            self.heads_before = attention_heads(work, self.example_inputs)
        for group in groups:
            if group.blocked is None and any(_in_excluded(use.unit, self.request.exclude)
                                             for use in group.uses):
                group.blocked = "excluded by the request"
        if not any(g.blocked is None for g in groups):
            raise UnsupportedModelError("the model has no prunable channel group (every group "
                                        "reaches the output, is excluded, or holds a layer that "
                                        "cannot be pruned)")
        with timer.phase("score"):
            if criterion.needs_data:
                criterion.prepare(work, self.loaders[0])
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
            cost = CostModel(work, self.example_inputs, DG, groups)
            cost.set_orders(orders)
        self.groups, self.orders, self.keys, self.cost = groups, orders, keys, cost
        self.reference_shapes = [tuple(t.shape) for t in forward_outputs(work,
                                                                         self.example_inputs)]
        with timer.phase("latency"):
            self.latency_steps.round_groups(work, self.example_inputs, groups, cost)
        if self.request.resolved_allocation == "latency-depth":
            with timer.phase("graph"):  # which groups the model works without (depth pruning)
                mark_emptiable(groups, work, self.example_inputs, orders)

    def _latency_allocation(self):
        """The latency allocation; with data and a target, the candidate whose pruned model
        has the lowest loss after a short fine-tune (`latency_choice`)."""
        latency = self._latency_model()
        if not self.loaders or self.target is None:
            return latency_allocation(self.groups, self.keys, latency)

        def remove(counts):
            return remove_channels(self.work, self.example_inputs, self.groups, self.orders,
                                   counts)

        with self.timer.phase("choose"):
            allocation, self.latency_steps.allocation_choice = choose_latency_allocation(
                self.groups, self.keys, latency, self.cost, self.target, remove,
                self.loaders[0])
        return allocation

    def _latency_model(self):
        with self.timer.phase("latency"):
            return self.latency_steps.model(self.work, self.example_inputs, self.cost)

    def _chooses_metanet_allocation(self) -> bool:
        """Whether the metanet path picks its allocation by a forward pass (`metanet_choice`):
        a metanetwork allocates, and data and a MACs or params target are given."""
        return (self.metanet is not None and self.request.resolved_allocation == "metanet"
                and bool(self.loaders) and self.target is not None
                and self.target.kind != "latency_speedup")

    def _remove_checked(self, counts) -> nn.Module:
        """A pruned copy of the dense model; a removal that breaks a block's shapes raises."""
        pruned = remove_channels(self.work, self.example_inputs, self.groups, self.orders, counts)
        check_pruned(pruned, self.example_inputs, self.reference_shapes)
        if any(count and count == group.size for count, group in zip(counts, self.groups)):
            check_connected(pruned, self.example_inputs)  # emptied groups may cut it together
        return pruned

    def _measured_damage(self, calibration, scoring, fractions=FRACTIONS,
                         budget_s: float | None = None) -> tuple[dict, bool]:
        """(`damage.measure_damage` of the dense model, whether it was cached): each group
        alone pruned by `fractions` of its channels, in the criterion's order. Raises
        `MeasurementOverBudget` before measuring when it would take longer than `budget_s`."""
        groups, keys = self.groups, self.keys

        def counts_for(index, fraction):
            ratios = [1.0 - fraction if i == index else 1.0 for i in range(len(groups))]
            return policy_allocation(groups, keys, ratios).counts(1.0)

        def measure():
            began = time.perf_counter()
            with torch.no_grad():
                dense_loss = recalibrated_loss(copy.deepcopy(self.work), calibration, scoring)
            check_measurement_budget(groups, fractions, time.perf_counter() - began, budget_s)
            return measure_damage(
                groups, counts_for=counts_for, remove=self._remove_checked,
                macs_of=lambda counts: self.cost.evaluate(counts)[0],
                loss_of=lambda model: recalibrated_loss(model, calibration, scoring),
                dense_loss=dense_loss, fractions=fractions)

        key = fingerprint(self.work, self.orders, [*calibration, *scoring], fractions,
                          [bool(g.blocked) for g in groups])
        return cached_measurement(key, measure)

    def _candidate_ratios(self, candidates, calibration,
                          scoring) -> tuple[list, list, dict | None]:
        """The candidates kept (the measured ones go when their measurement is over budget),
        per candidate the keep ratio of every group, and a note of the measurement."""
        request, groups = self.request, self.groups
        prior = uniform_prior(request.speedup, request.params_ratio)
        names = {name for name, _ in self.work.named_modules()}
        measured, note = None, None
        if any(c.source == "measured" for c in candidates):
            try:
                measurement, cached = self._measured_damage(calibration, scoring,
                                                            budget_s=MEASUREMENT_BUDGET_S)
            except MeasurementOverBudget as over:
                note = {"skipped": str(over), "budget_s": MEASUREMENT_BUDGET_S}
                candidates = [c for c in candidates if c.source != "measured"]
            else:
                # a params target spends MACs as the equivalent speed-up would
                equivalent = request.speedup or 1.0 / request.params_ratio
                measured = damage_policy(measurement, equivalent)
                note = {"groups": len(measurement["groups"]), "fractions": list(FRACTIONS),
                        "reused": cached}
        ratios = []
        for candidate in candidates:
            if candidate.source == "head":
                ratios.append(policy_to_groups(
                    blended_policy(self.policy_from_metanet, prior, candidate.strength),
                    groups, names))
            elif candidate.source == "measured":
                ratios.append([1.0 if g.root not in measured else
                               min(1.0, prior ** (1 - candidate.strength)
                                   * measured[g.root] ** candidate.strength) for g in groups])
            else:
                ratios.append([1.0 if g.blocked else prior for g in groups])
        return candidates, ratios, note

    def _metanet_ratios(self) -> list[float]:
        """The keep ratio of every group: the `metanet_choice` candidate (the sparsity head's
        or the measured allocation, blended towards uniform) whose pruned model has the lowest
        recalibrated loss on training batches. Chosen once per run."""
        if self.metanet_ratios is not None:
            return self.metanet_ratios
        candidates = candidates_for(
            self.after_prune, head=self.policy_from_metanet is not None,
            # a metanetwork object may fix its own candidates (e.g. one strength: no choice)
            head_strengths=getattr(self.metanet, "head_strengths", None)
            if self.policy_from_metanet is not None else None)
        goal, target, cost = self.target.goal(self.cost), self.target, self.cost

        def counts_of(ratios):
            return solve_counts(policy_allocation(self.groups, self.keys, ratios), cost,
                                target, goal)

        def meets_target(pruned):
            achieved = target.achieved(cost.macs_before, count_macs(pruned, self.example_inputs),
                                       cost.params_before, count_params(pruned))
            return target.error(achieved) <= TOLERANCE

        with self.timer.phase("choose"):
            calibration, scoring = calibration_and_scoring(self.loaders[0])
            candidates, ratios, measured = self._candidate_ratios(candidates, calibration,
                                                                  scoring)
            chosen, note = choose_candidate(
                list(zip(candidates, ratios)), counts_of=counts_of, remove=self._remove_checked,
                meets_target=meets_target, calibration=calibration, scoring=scoring)
        if measured is not None:
            note["measured"] = measured
        self.metanet_ratios = ratios[chosen]
        self.allocation_used = "metanet"
        self.metanet_entry = {**(self.metanet_entry or {}), "allocation_choice": note}
        return self.metanet_ratios

    def _allocation(self):
        """The allocation family the target is bisected over (built after groups are final)."""
        if self._chooses_metanet_allocation():
            return policy_allocation(self.groups, self.keys, self._metanet_ratios())
        names = {name for name, _ in self.work.named_modules()}
        policy = self.policy_from_metanet or self.request.policy
        if policy is not None:
            return policy_allocation(self.groups, self.keys,
                                     policy_to_groups(policy, self.groups, names))
        if self.request.resolved_allocation == "uniform":
            return uniform_allocation(self.groups, self.keys)
        if self.request.resolved_allocation in ("latency", "latency-depth"):
            return self._latency_allocation()
        return global_allocation(self.groups, self.keys)

    # 5 --------------------------------------------------------------------------------------
    def prune_to_target(self) -> None:
        """The one retry loop: allocate, remove, count; correct the goal or block and retry."""
        work, inputs, groups, orders, cost = (self.work, self.example_inputs, self.groups,
                                              self.orders, self.cost)
        timer, target = self.timer, self.target
        if target is not None and target.kind == "latency_speedup":
            self._prune_to_latency()
            return
        goal = target.goal(cost) if target is not None else None
        allocation, probed, corrections = None, False, 0
        best, best_miss = None, float("inf")
        while corrections <= _MAX_CORRECTIONS:
            try:
                with timer.phase("allocate"):
                    allocation = allocation or self._allocation()
                    counts = allocation.counts(1.0) if target is None \
                        else self._solve(allocation, target, goal)
                with timer.phase("prune"):
                    pruned = self._remove_checked(counts)
            except DisconnectedError:
                if not self._stop_emptying():
                    raise
                allocation, best, best_miss = None, None, float("inf")
                continue
            except UnsupportedModelError:
                # A removal broke a block's baked shapes: block the groups that do it, once.
                if probed:
                    raise
                probed = True
                with timer.phase("probe"):
                    if not block_breaking_groups(work, inputs, groups, orders) or \
                            all(g.blocked for g in groups):
                        raise
                allocation, best, best_miss = None, None, float("inf")
                continue
            if target is None:
                self.pruned = pruned  # a policy applied as is
                return
            with timer.phase("verify"):
                real = count_macs(pruned, inputs) if target.kind == "speedup" \
                    else count_params(pruned)
            miss = abs(real / target.goal(cost) - 1.0)
            if miss < best_miss:
                best, best_miss = pruned, miss
            if miss <= _RECOUNT_TOLERANCE:
                break
            # The analytic model is off by real/predicted here; ask it for proportionally less.
            predicted = cost.evaluate(counts)[0 if target.kind == "speedup" else 1]
            goal = target.goal(cost) * predicted / real
            corrections += 1
        achieved = target.achieved(cost.macs_before, count_macs(best, inputs),
                                   cost.params_before, count_params(best))
        rounded_to = self.latency_steps.rounded_to
        if target.error(achieved) > TOLERANCE and rounded_to:
            self.latency_steps.target_note = {
                "kind": target.kind, "value": target.value, "achieved": achieved,
                "reached": False, "why": f"round_to={rounded_to} leaves no kept widths closer to "
                                         f"the target than {achieved:.4g}"}
        elif target.error(achieved) > TOLERANCE:
            raise InvalidTargetError(
                f"{target.kind} {target.value:g} cannot be met within {TOLERANCE:.0%}: the "
                f"closest channel counts give {achieved:.6g}, {achieved / target.value - 1:+.2%} "
                "off the target (the model's layers are too narrow for a finer step)")
        self.pruned = best

    def _stop_emptying(self) -> bool:
        """After emptied groups cut the model together: no group is emptied any more (the
        report's allocation says "latency"). False when none was emptiable."""
        emptiable = [group for group in self.groups if group.emptiable]
        for group in emptiable:
            group.emptiable = False
        if emptiable:
            self.allocation_used = "latency"
        return bool(emptiable)

    def _solve(self, allocation, target, goal) -> list[int]:
        """Counts meeting `goal`; with `round_to`, as close as the rounded widths allow."""
        try:
            return solve_counts(allocation, self.cost, target, goal)
        except InvalidTargetError:
            if not self.latency_steps.rounded_to:
                raise
            return allocation.counts(allocation.high)  # the report says what was reached

    def _prune_to_latency(self) -> None:
        """A measured latency target: the latency model's counts, timed and corrected."""
        work, inputs, groups, orders, timer = (self.work, self.example_inputs, self.groups,
                                               self.orders, self.timer)

        def remove(counts):
            with timer.phase("prune"):
                return self._remove_checked(counts)

        for probed in (False, True):
            try:
                allocation = self._allocation()
                with timer.phase("latency"):
                    self.pruned = self.latency_steps.prune_to_latency(
                        self.module, inputs, allocation, self.cost, work, self.target, remove)
                return
            except DisconnectedError:
                if not self._stop_emptying():
                    raise
            except UnsupportedModelError:
                # A removal broke a block's baked shapes: block the groups that do it, once.
                with timer.phase("probe"):
                    if probed or not block_breaking_groups(work, inputs, groups, orders) or \
                            all(g.blocked for g in groups):
                        raise

    # 6 --------------------------------------------------------------------------------------
    def finetune_pruned(self) -> None:
        if self.loaders is None:
            return
        # With 0 epochs this only recalibrates BatchNorm statistics (if the config says so).
        with self.timer.phase("finetune"):
            self.finetune_record["history"] += training_bridge.finetune(
                self.pruned, self.loaders[0], epochs=self.after_prune,
                config=self.request.finetune,
                eval_loader=self.loaders[1] if self.after_prune else None, teacher=self.module)
            self.finetune_record["epochs_after_prune"] = self.after_prune

    def _skipped_reason(self) -> str | None:
        if self.loaders is None:
            return "no data was given, so the pruned model was not fine-tuned"
        if self.after_prune == 0:
            return "finetune_epochs is 0" if self.request.finetune_epochs == 0 else \
                "the whole fine-tune budget was spent after the metanetwork"
        return None

    # 7 --------------------------------------------------------------------------------------
    def measure_pruned(self) -> None:
        pruned, inputs = self.pruned, self.example_inputs
        with self.timer.phase("evaluate"):
            self.figures["accuracy_after"] = training_bridge.evaluate(
                pruned, self.loaders[1]) if self.loaders else None
            if self.text:
                self.figures["perplexity_after"] = training_bridge.perplexity(
                    pruned, self.loaders[1])
        with self.timer.phase("measure"):
            self.figures["macs_after"] = count_macs(pruned, inputs)
            self.figures["params_after"] = count_params(pruned)
        with self.timer.phase("latency"):
            self.figures.update(self.latency_steps.report_keys(self.module, pruned, inputs))
        pruned.train(self.module.training)

    def report(self) -> dict:
        request = self.request
        skipped = self._skipped_reason()
        return build_report(
            **self.figures,
            version=metaprune.__version__,
            kept=_kept_channels(self.module, self.pruned),
            kept_heads=_kept_heads(self.heads_before,
                                   attention_heads(self.pruned, self.example_inputs)),
            left_alone=_left_alone(self.groups),
            save_pretrained=save_pretrained_note(self.pruned),
            excluded=list(request.exclude),
            round_to=self.latency_steps.rounded_to,
            target=self.latency_steps.target_note,
            finetune=None if skipped and not self.finetune_record["epochs_after_metanet"]
            else self.finetune_record,
            finetune_skipped_reason=skipped,
            method=request.method, criterion=request.resolved_criterion,
            allocation=self.allocation_used,
            metanet=self.metanet_entry,
            seed=training_bridge.seed_of(request.finetune),
            seconds=self.timer.seconds,
        )


def _kept_heads(before: dict[str, int], after: dict[str, int]) -> dict[str, list[int]]:
    """Attention module -> [kept, total] heads (whole heads only).

    A module left with one head has no head axis for the trace to count (size 1); pruning
    always keeps at least one unit of a group, so a module missing after pruning kept one.
    """
    return {name: [int(after.get(name, 1)), int(total)] for name, total in before.items()}


def _left_alone(groups) -> dict[str, str]:
    """Layers whose channels stayed because their group could not be pruned, and why
    (groups that merely reach the model's output or are single channels are not listed)."""
    quiet = ("reaches the model output", "a single channel", "a vocabulary",
             "the model's input", "excluded by the request")
    left = {}
    for group in groups or ():
        if group.blocked and not group.blocked.startswith(quiet):
            for use in group.uses:
                left.setdefault(use.unit, group.blocked)
    return left


def plan_for_damage(module: nn.Module, example_inputs, loader, *, criterion: str = "l2",
                    fractions=FRACTIONS) -> dict:
    """`damage.measure_damage` of a dense model, planned as `prune(method=criterion)` plans it
    (`damage.measure_model_damage` is the public name; the training labels use it).

    Example::

        measurement = plan_for_damage(model, (torch.randn(1, 1, 40),), train_loader)
        measurement["groups"][0]["damage"]   # loss increase per measured fraction
    """
    # the target is never used: only the plan (groups, orders, cost model) is built
    run = _Run(module, example_inputs, PruneRequest(method=criterion, speedup=2.0,
                                                    latency=False))
    run.criterion = build_criterion(criterion)
    run.loaders = (loader, None)
    run.work = copy.deepcopy(module)
    run.plan()
    calibration, scoring = calibration_and_scoring(loader)
    return run._measured_damage(calibration, scoring, fractions)[0]


def prune_request(module: nn.Module, example_inputs: Sequence[torch.Tensor],
                  request: PruneRequest) -> PruneResult:
    """`prune` for an already checked `PruneRequest` (what the CLI, service and `tune` hold).

    Example::

        from metaprune.vocabulary import PruneRequest
        request = PruneRequest(criterion="l1", speedup=2.0, latency=False)
        result = prune_request(model, (torch.randn(1, 3, 32, 32),), request)
    """
    run = _Run(module, example_inputs, request)
    run.prepare()
    run.measure_dense()
    run.rewrite_with_metanet()
    run.plan()
    run.prune_to_target()
    run.finetune_pruned()
    run.measure_pruned()
    return PruneResult(run.pruned, run.report())


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
    latency_speedup: float | None = None,
    latency_batch: int = 1,
    round_to: int | str | None = None,
    latency: bool = True,
    exclude: Sequence[str] = (),
) -> PruneResult:
    """Prunes whole channels of `module` to a MACs, params or measured latency target.

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
            when the checkpoint's head is untrained), `"latency"` (channels that cost the most
            measured time per unit of importance go first; tables per layer measured on this
            CPU and cached), `"latency-depth"` (the same, and a residual branch may lose all
            its channels: depth pruning, `metaprune.pruning.depth`), or a policy.
        speedup: MACs before / MACs after to reach (within 2 %), above 1.
        params_ratio: params after / params before to reach (within 2 %), in (0, 1).
        policy: module name -> keep ratio: a dict, a recipe written by `metaprune tune`, or a
            JSON path of either; applied as is without a target, rescaled to the target with one.
        data: a dataset id, a folder, or a `(train_loader, test_loader)` pair; enables
            accuracy figures, gradient criteria, BN recalibration and fine-tuning. Samples whose
            shape differs from the model's example input only by size-1 dimensions are reshaped
            (the report says so); any other mismatch is an error before any work.
        finetune_epochs: epochs of fine-tuning in all (needs `data`). Without a metanetwork
            they all follow pruning, and with one too unless ``finetune["metanet_epochs"]``
            moves some right after the rewrite (default 0: measured better, see
            `benchmarks/metanet.md`).
        finetune: fine-tune settings (`optimizer`, `lr`, `schedule`, `distill`,
            `bn_recalibration`, `seed`).
        latency_speedup: latency before / after to reach, measured on this machine at
            `latency_batch` (one torch thread); reached when the measured speed-up lies in
            [0.95, 1.1] x the target (the report's `target` says how it went).
        latency_batch: batch size of every latency measurement (default 1).
        round_to: every pruned group keeps a multiple of this many channels, for any target;
            `"auto"` measures the multiple this CPU rewards. A MACs or params target is met
            within 2 % where the rounded widths allow, else the report's `target` says what
            was reached.
        latency: False skips the report's latency measurement (its keys are null).
        exclude: module names left unpruned, each with its submodules.

    Example::

        import torch, metaprune
        from metaprune.zoo import build, default_config
        model = build("resnet", default_config("resnet", input_shape=(3, 32, 32), num_classes=10))
        example_inputs = (torch.randn(1, 3, 32, 32),)
        result = metaprune.prune(model, example_inputs, method="l2", speedup=2.0)
        result.report["speedup"]      # 2.0 ± 2 %
        result.model(*example_inputs)  # runs, with fewer channels
    """
    request = PruneRequest(
        method=method, criterion=criterion, metanet=metanet, allocation=allocation,
        speedup=speedup, params_ratio=params_ratio, latency_speedup=latency_speedup,
        latency_batch=latency_batch, round_to=round_to, latency=latency, exclude=exclude,
        policy=policy, data=data, finetune_epochs=finetune_epochs, finetune=finetune)
    return prune_request(module, example_inputs, request)
