"""`PruneRequest`: one pruning request, checked once, in the same words everywhere.

`prune()` builds one from its keywords; the CLI from its flags; the gRPC client turns one into
a `SubmitJobRequest`; the server checks a submitted job by building one; `tune` builds one per
trial. Torch-free: constructing a request checks every name and bound (DESIGN §5, §6) without
a model, so bad input fails before any work. What needs the model (policy module names,
`exclude` names, input shapes) is checked by the engine before it starts.

Example::

    request = PruneRequest(method="l1", speedup=2.0, exclude=("classifier",))
    request.target                  # ('speedup', 2.0)
    request.to_options()            # {'method': 'l1', 'speedup': 2.0, 'exclude': ('classifier',)}
    PruneRequest(speedup=0.5)       # InvalidTargetError: speedup must be a number above 1 ...
"""

from dataclasses import dataclass, fields
from os import PathLike

from metaprune.errors import InvalidTargetError, MissingDataError
from metaprune.vocabulary import bounds
from metaprune.vocabulary.checkpoints import DEFAULT_NAME, fallback_hint
from metaprune.vocabulary.names import (
    ALLOCATIONS,
    CRITERIA,
    DATA_CRITERIA,
    DATA_FREE_CRITERIA,
    METHODS,
    OPTIMIZERS,
    SCHEDULES,
)
from metaprune.vocabulary.policy import is_policy_file, parse_policy

# The three targets; at most one per request.
TARGETS = ("speedup", "params_ratio", "latency_speedup")


@dataclass
class PruneRequest:
    """Every keyword of `metaprune.prune`, checked and normalised on construction.

    Raises `InvalidTargetError` for a malformed name or number, `MissingDataError` when the
    choices need data that was not given.
    """

    # "metanet", or a criterion on its own; "metanet" implies metanet="default",
    # allocation="metanet", criterion="l2", each overridable by its own field
    method: str = "l2"
    # importance criterion (CRITERIA); None: the method's
    criterion: str | None = None
    # None, "default", a checkpoint name or path, or a loaded metanetwork object
    metanet: object = None
    # "global", "uniform", "metanet", "latency" — or a policy (mapping or JSON path), which
    # moves to `policy` and leaves "policy" here
    allocation: object = "global"
    # MACs before / after (> 1)
    speedup: float | None = None
    # params after / before, in (0, 1)
    params_ratio: float | None = None
    # latency before / after at `latency_batch` (> 1), measured on this machine
    latency_speedup: float | None = None
    # batch size of every latency measurement
    latency_batch: int = 1
    # kept channel counts become multiples of this (an int, or "auto"); None: no rounding
    round_to: int | str | None = None
    # False skips the report's latency measurement
    latency: bool = True
    # module names left unpruned (each with its submodules)
    exclude: tuple = ()
    # module name -> keep ratio: a mapping, a `tune` recipe, or a JSON path of either; read
    # here into a checked dict
    policy: object = None
    # a dataset id, a folder or .npz path, or a (train_loader, test_loader) pair
    data: object = None
    # fine-tuning epochs in all (needs data to have an effect)
    finetune_epochs: int = 0
    # fine-tune settings: optimizer, lr, schedule, distill, bn_recalibration, seed, ...
    finetune: dict | None = None

    def __post_init__(self) -> None:
        bounds.check_choice("method", self.method, METHODS)
        if self.criterion is not None:
            bounds.check_choice("criterion", self.criterion, CRITERIA, "criteria")
        if isinstance(self.allocation, dict) or is_policy_file(self.allocation):
            if self.policy is not None:
                raise InvalidTargetError("give the policy either as allocation or as policy, "
                                         "not both")
            self.policy, self.allocation = self.allocation, "policy"
        elif self.allocation != "policy":
            if self.allocation not in ALLOCATIONS:
                raise InvalidTargetError(
                    f"unknown allocation {str(self.allocation)[:80]!r}; use one of "
                    f"{', '.join(ALLOCATIONS)} or a policy (mapping or JSON file)")
        given = [name for name in TARGETS if getattr(self, name) is not None]
        if len(given) > 1:
            raise InvalidTargetError(f"give at most one target, not both {given[0]} and "
                                     f"{given[1]}")
        if self.speedup is not None:
            self.speedup = bounds.check_speedup(self.speedup)
        if self.params_ratio is not None:
            self.params_ratio = bounds.check_params_ratio(self.params_ratio)
        if self.latency_speedup is not None:
            self.latency_speedup = bounds.check_speedup(self.latency_speedup, "latency_speedup")
        self.latency_batch = bounds.check_latency_batch(self.latency_batch)
        self.round_to = bounds.check_round_to(self.round_to)
        self.latency = bounds.check_flag("latency", self.latency)
        self.exclude = bounds.check_module_names("exclude", self.exclude or ())
        if self.policy is not None:
            self.policy = parse_policy(self.policy)
            if self.allocation == "global":
                self.allocation = "policy"
        self.finetune_epochs = bounds.check_finetune_epochs(self.finetune_epochs)
        self._check_finetune_names()
        self._check_data()
        if self.target is None and self.policy is None and self.resolved_allocation != "metanet":
            raise InvalidTargetError("nothing to prune to: give a speedup, a params_ratio, "
                                     "a latency_speedup or a policy")

    def _check_finetune_names(self) -> None:
        """Names only: `metaprune.finetune.FinetuneConfig` checks the rest (it imports torch)."""
        if self.finetune is None:
            return
        if not isinstance(self.finetune, dict):
            raise InvalidTargetError(f"finetune must be a mapping of settings, got "
                                     f"{type(self.finetune).__name__}")
        if "optimizer" in self.finetune:
            bounds.check_choice("optimizer", self.finetune["optimizer"], OPTIMIZERS)
        if "schedule" in self.finetune:
            bounds.check_choice("schedule", self.finetune["schedule"], SCHEDULES)

    def _check_data(self) -> None:
        data = self.data
        if data is not None and not isinstance(data, (str, PathLike)) and not (
                isinstance(data, (tuple, list)) and len(data) == 2):
            raise InvalidTargetError("data must be a dataset id, a folder or .npz path, or a "
                                     "(train_loader, test_loader) pair")
        if data is not None:
            return
        if self.resolved_metanet is not None:
            raise MissingDataError(
                "the metanetwork path needs data: its rewritten weights must be recovered by "
                f"fine-tuning, so give a dataset; or {fallback_hint()}")
        if self.resolved_criterion in DATA_CRITERIA:
            raise MissingDataError(
                f"criterion {self.resolved_criterion!r} needs data (it uses gradients of the "
                f"loss); give a dataset or use a data-free criterion: "
                f"{', '.join(DATA_FREE_CRITERIA)}")

    # --- what the choices imply ---------------------------------------------------------------
    @property
    def resolved_criterion(self) -> str:
        if self.criterion is not None:
            return self.criterion
        return "l2" if self.method == "metanet" else self.method

    @property
    def resolved_allocation(self) -> str:
        """The allocation id the engine uses: "policy" when a policy is given."""
        if self.method == "metanet" and self.allocation == "global":
            return "metanet"
        return self.allocation

    @property
    def resolved_metanet(self):
        """The metanetwork to load (None: none): method or allocation "metanet" imply default."""
        if self.metanet is not None:
            return self.metanet
        if self.method == "metanet" or self.allocation == "metanet":
            return DEFAULT_NAME
        return None

    @property
    def target(self) -> tuple[str, float] | None:
        """(kind, value) of the one target given, or None (a policy applied as is)."""
        for name in TARGETS:
            value = getattr(self, name)
            if value is not None:
                return name, value
        return None

    # --- conversions ----------------------------------------------------------------------------
    def to_options(self) -> dict:
        """The `prune()` keywords that differ from their defaults (policy as a checked dict)."""
        options = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name == "allocation" and value == "policy":
                continue  # the policy travels under `policy`
            if value != spec.default:
                options[spec.name] = value
        return options

    @classmethod
    def from_options(cls, options: dict) -> "PruneRequest":
        """A request from `prune()` keywords; unknown keys are refused by name."""
        known = {spec.name for spec in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidTargetError(f"unknown pruning option(s): {', '.join(unknown)}; valid: "
                                     f"{', '.join(sorted(known))}")
        return cls(**options)
